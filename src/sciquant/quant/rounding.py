"""What AdaRound's two implementations share, with no framework imported: the rectified
sigmoid's stretch and the settings of the optimisation (`sciquant.quant.adaround` for PyTorch,
`sciquant.quant.keras_adaround` for Keras)."""

from __future__ import annotations

from dataclasses import dataclass

from sciquant.errors import SciquantError

__all__ = ["GAMMA", "ZETA", "AdaRoundSettings", "keeps_nearest", "layer_report", "layer_summary"]

#: What AdaRound reconstructs (`quantize.adaround.reconstruction`): each layer's output, or each
#: block's (`sciquant.quant.adaround.reconstruction_blocks`; PyTorch).
RECONSTRUCTIONS = ("layer", "block")

#: The rectified sigmoid's stretch (AdaRound's ζ and γ): h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1).
ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundSettings:
    """AdaRound's optimisation per layer (the paper's defaults where it has them); the config's
    `quantize.adaround` gives iterations, reg_lambda, batch_rows and max_rows. Rows are input
    vectors: nodes or edges of a graph layer, inputs of a Dense layer, output pixels of a
    Conv2D."""

    iterations: int = 1000
    reg_lambda: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    learning_rate: float = 1e-3
    batch_rows: int = 1024
    max_rows: int = 32768
    reconstruction: str = "layer"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_rows < 1 or self.max_rows < 1:
            raise SciquantError(
                "quantize.adaround: iterations, batch_rows and max_rows must be positive"
            )
        if not 0 <= self.warmup < 1:
            raise SciquantError(f"quantize.adaround.warmup must be in [0, 1), got {self.warmup}")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise SciquantError(
                f"quantize.adaround.reconstruction: {self.reconstruction!r} is not one of "
                f"{list(RECONSTRUCTIONS)}"
            )
        if self.reg_lambda < 0 or self.learning_rate <= 0:
            raise SciquantError("quantize.adaround: reg_lambda must be ≥ 0 and learning_rate > 0")


def keeps_nearest(mse_nearest: float, mse_adaround: float) -> bool:
    """Whether a layer keeps nearest rounding: AdaRound's hard rounding came out worse on the
    layer's rows (an optimisation cut short can end there; the result is never worse)."""
    return mse_adaround > mse_nearest


def layer_summary(
    mse_nearest: float, mse_adaround: float, flipped: float, kept_nearest: bool
) -> dict[str, float]:
    """One rounded layer's record (`layer_report` prints it): its reconstruction MSEs with
    nearest rounding and with the rounding it keeps, the share of weights rounded the other way
    than nearest, and 1.0 where it kept nearest."""
    return {
        "mse_nearest": mse_nearest,
        "mse_adaround": mse_adaround,
        "flipped": flipped,
        "kept_nearest": float(kept_nearest),
    }


def layer_report(index: int, count: int, name: str, summary: dict[str, float]) -> str:
    """The progress line of one rounded layer (`summary`: its reconstruction MSEs with nearest
    rounding and AdaRound's, the share of flipped weights, whether it kept nearest)."""
    return (
        f"adaround {index + 1}/{count} {name}: reconstruction MSE "
        f"{summary['mse_nearest']:.3g} (nearest) -> {summary['mse_adaround']:.3g}, "
        f"{100 * summary['flipped']:.1f} % of weights rounded the other way"
        + (" (worse than nearest: kept nearest)" if summary["kept_nearest"] else "")
    )
