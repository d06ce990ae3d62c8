"""The SE-placement study: confidence intervals, sweep cells cached by content, and `effdeploy compare`."""
