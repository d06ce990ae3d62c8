"""Numbers we print: SNR in dB, top-k accuracy, agreement. One definition each, used everywhere."""

from __future__ import annotations

import numpy as np


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10*log10(sum(ref^2) / sum((test - ref)^2)) in dB; +inf when identical."""
    ref = np.asarray(reference, dtype=np.float64)
    err = np.asarray(test, dtype=np.float64) - ref
    noise = float(np.sum(err * err))
    signal = float(np.sum(ref * ref))
    return snr_from_sums(signal, noise)


def snr_from_sums(signal: float, noise: float) -> float:
    """The same SNR from accumulated sums of ref^2 and (test - ref)^2 (for streaming over batches)."""
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


class SnrAccumulator:
    """SNR per name over many batches: sums of ref^2 and (test - ref)^2, then one snr_from_sums.
    Serves the per-layer SNR of the simulation and of every runtime alike."""

    def __init__(self) -> None:
        self.signal: dict[str, float] = {}
        self.noise: dict[str, float] = {}

    def add(self, name: str, reference, test) -> None:
        ref = np.asarray(reference, dtype=np.float64)
        err = np.asarray(test, dtype=np.float64).reshape(ref.shape) - ref
        self.signal[name] = self.signal.get(name, 0.0) + float(np.sum(ref * ref))
        self.noise[name] = self.noise.get(name, 0.0) + float(np.sum(err * err))

    def result(self) -> dict[str, float]:
        return {n: snr_from_sums(self.signal[n], self.noise[n]) for n in self.signal}


def linear_snr_to_db(ratio: float) -> float:
    """ai-edge-quantizer's validator reports SNR as a linear power ratio; convert to dB."""
    return 10.0 * float(np.log10(ratio))


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Ties go to the lower class index, as ``argmax`` breaks them (int8 logits tie often): so
    two outputs with the same argmax always score the same top-1."""
    k = min(k, logits.shape[1])
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(topk == np.asarray(labels)[:, None], axis=1)))


def top1_agreement(reference_logits: np.ndarray, test_logits: np.ndarray) -> float:
    return float(np.mean(reference_logits.argmax(1) == test_logits.argmax(1)))


def max_abs_diff(reference: np.ndarray, test: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(reference, np.float64) - np.asarray(test, np.float64))))


# what a runtime artifact owes the simulation of its configuration (the quantizer's contract)
CONTRACT_AGREEMENT = 0.99
CONTRACT_SNR_GAP_DB = 1.0


def within_contract(artifact: dict) -> bool:
    """Whether a runtime artifact (a report row with its agreement and SNR gap against its
    simulation) reproduces the simulation: top-1 agreement >= 99% and |SNR gap| < 1 dB."""
    return bool(
        artifact["agreement_with_simulation"] >= CONTRACT_AGREEMENT
        and abs(artifact["snr_gap_db"]) < CONTRACT_SNR_GAP_DB
    )
