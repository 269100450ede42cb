"""Adapter configuration: plain values only, so it can come from YAML, Hydra or the Lightning CLI."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

COMPUTE_MODES = ("auto", "weight", "activation")
INIT_MODES = ("default", "gaussian")


@dataclass
class AdapterConfig:
    """What to inject, where, and how big.

    Args:
        method: one of ``segadapt.adapters.METHODS`` (``lora``, ``lora_c``, ``conv_lora``, ``dora_c``,
            ``conv_dora``, ``cp_lora``, ``cp_dora``, ``salt``, ``tlora``).
        rank: r. LoRA forms: rank of the update; CP: number of rank-one terms; SALT: number of top
            singular values given a scale and shift; TLoRA: tensor-ring rank of the residual D.
        alpha: scaling numerator, s = alpha / r (alpha / sqrt(r) with ``use_rslora``). ``None``
            means alpha = r, i.e. s = 1.
        targets: which modules to adapt: a regex matched against the full module name
            (``re.fullmatch``) or a list of name suffixes (``"qkv"`` matches ``blocks.0.attn.qkv``;
            a full name is a suffix of itself).
        exclude: modules never adapted, same forms as ``targets``.
        rank_pattern: per-module rank overrides, ``{regex-or-suffix: rank}``; the first match wins.
        dropout: dropout on the adapter branch input (activation-space forms only).
        init: ``"default"`` (kaiming-uniform down factors) or ``"gaussian"`` (N(0, 1/r)).
        use_rslora: s = alpha / sqrt(r) (rank-stabilised scaling).
        compute: ``"auto"`` picks weight space or activation space per layer from a cost model;
            ``"weight"`` / ``"activation"`` force one (activation falls back to weight where a layer
            has no activation form or its base weight requires grad).
        lora_rank: SALT: rank of the low-rank update on the remaining singular directions.
        salt_relu: SALT: clamp the r transformed top singular values at zero (the public SALT code
            applies relu to all of Sigma', including diag(sig_rest) + X Y; see ``salt.py``).
        ring_rank: TLoRA: tensor-ring rank of the transform T (its cost grows as ring_rank^3).
        tlora_max_factor: TLoRA: the largest factor used to factorise a dimension for the rings.
    """

    method: str = "lora"
    rank: int = 8
    alpha: Optional[float] = None
    targets: Union[str, list[str]] = field(default_factory=list)
    exclude: Union[str, list[str]] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    dropout: float = 0.0
    init: str = "default"
    use_rslora: bool = False
    compute: str = "auto"
    lora_rank: int = 8
    salt_relu: bool = True
    ring_rank: int = 2
    tlora_max_factor: int = 16

    def __post_init__(self) -> None:
        # Hydra/OmegaConf hand over ListConfig/DictConfig; keep plain Python values.
        if not isinstance(self.targets, str):
            self.targets = [str(t) for t in self.targets]
        if not isinstance(self.exclude, str):
            self.exclude = [str(t) for t in self.exclude]
        self.rank_pattern = {str(k): int(v) for k, v in dict(self.rank_pattern).items()}
        self.validate()

    def validate(self) -> None:
        """Check the values that do not depend on the model (the method name is checked by the registry)."""
        if int(self.rank) != self.rank or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        for pattern, rank in self.rank_pattern.items():
            if rank <= 0:
                raise ValueError(f"rank_pattern['{pattern}'] must be a positive integer, got {rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {self.compute!r}")
        if self.init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {self.init!r}")
        if self.lora_rank < 0 or self.ring_rank <= 0 or self.tlora_max_factor < 2:
            raise ValueError(
                f"lora_rank >= 0, ring_rank > 0 and tlora_max_factor >= 2 required, got "
                f"{self.lora_rank}, {self.ring_rank}, {self.tlora_max_factor}"
            )
        if isinstance(self.targets, str):
            re.compile(self.targets)
        elif not self.targets:
            raise ValueError("targets is empty: give a regex or a list of module-name suffixes")

    def scaling(self, rank: int) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        alpha = float(rank if self.alpha is None else self.alpha)
        return alpha / (rank**0.5 if self.use_rslora else rank)

    def rank_for(self, module_name: str) -> int:
        """The rank for one module, after ``rank_pattern`` overrides."""
        for pattern, rank in self.rank_pattern.items():
            if name_matches(module_name, pattern):
                return rank
        return self.rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "AdapterConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown AdapterConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


def name_matches(name: str, pattern: Union[str, list[str]]) -> bool:
    """True if ``name`` matches a regex (fullmatch), a list of suffixes, or one suffix-or-regex
    string used as a ``rank_pattern`` key."""
    if isinstance(pattern, str):
        return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in pattern)
