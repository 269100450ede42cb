"""Adapter configuration: plain values only, so it can come from YAML, Hydra or the Lightning CLI."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

COMPUTE_MODES = ("auto", "weight", "activation")
INIT_MODES = ("default", "gaussian", "pissa", "eva")


@dataclass
class AdapterConfig:
    """What to inject, where, and how big.

    Args:
        method: one of ``segadapt.adapters.METHODS`` (``lora``, ``lora_c``, ``conv_lora``, ``dora_c``,
            ``conv_dora``, ``cp_lora``, ``cp_dora``, ``salt``, ``tlora``).
        rank: r. LoRA forms: rank of the update; CP: number of rank-one terms; SALT: number of top
            singular values given a scale and shift; TLoRA: tensor-ring rank of the residual D.
        alpha: scaling numerator, s = alpha / r (alpha / sqrt(r) with ``use_rslora``). ``None``
            means s = 1 (alpha = r, or sqrt(r) with ``use_rslora``). SALT applies s, with r =
            ``lora_rank``, to its term X Y.
        targets: which modules to adapt: a string is a regex that must match the *whole* module name
            (``re.fullmatch``: ``"qkv"`` matches only a top-level ``qkv``, ``r".*\\.qkv"`` every one);
            a list holds name suffixes (``["qkv"]`` matches ``blocks.0.attn.qkv``; a full name is a
            suffix of itself).
        exclude: modules never adapted, same forms as ``targets``.
        train_modules: modules trained in full beside the adapters (PEFT's ``modules_to_save``), same
            forms as ``targets``, matched against every module (not only layers): e.g. a new mask head
            or a decoder. Each adapter trains its own copy (see ``trained.py``); saved in the adapter
            file, restored by ``load_adapter``, kept by ``merge_and_unload``. ``None`` or ``[]``: none.
        norms: also train the affine parameters (scale, shift) of every normalisation layer
            (BatchNorm, InstanceNorm, GroupNorm, LayerNorm with affine parameters) outside the
            ``train_modules``: each is one more trained module (same copy, file and merge as
            ``train_modules``; :func:`segadapt.adapters.model.norm_layers`).
        cap_rank: cap each layer's rank (after ``rank_pattern``) at the most the method builds on that
            layer (the family's ``rank_cap``: its ``rank_bound``, e.g. max(Cout, Cin k^d) for LoRA,
            max(Cout k, Cin k^(d-1)) for LoRA-C, prod(shape) / min(shape) for CP, min(Cout, Cin k^d) for
            SALT; with ``init="pissa"`` the principal directions there are, min(Cout, Cin k^d) for LoRA and
            min(Cout k, Cin k^(d-1)) / k for LoRA-C; with ``init="eva"`` at most Cin k^d) instead of refusing
            a larger one; :func:`segadapt.adapters.model.capped_ranks` lists the layers so capped.
        rank_pattern: per-module rank overrides, ``{suffix-or-regex: rank}``: a key matches a module
            whose name ends with ``"." + key`` (or equals it) or that it fullmatches as a regex; the
            first match wins.
        dropout: dropout on the adapter branch input. A layer with dropout computes its branch in
            activation space in training, whatever ``compute`` says (weight space cannot drop
            inputs); methods or layers without an activation form refuse it at injection, and
            ``compute="weight"`` refuses it here.
        init: ``"default"`` (kaiming-uniform down factors) or ``"gaussian"`` (normal with standard
            deviation 1/r, PEFT's ``init_lora_weights="gaussian"``; for CP the Khatri-Rao product of
            the d + 1 non-zero factors, i.e. M(dW)'s down factor, has that standard deviation), or
            ``"pissa"`` (lora, conv_lora, lora_c, cp_lora and their DoRA forms: the adapter starts on the
            principal part of W0 -- top-r singular directions, or for CP a rank-r PARAFAC of W0 -- and
            the base keeps the residual; see ``lora.py`` / ``cp.py``), or ``"eva"`` (lora, conv_lora,
            conv_dora: A from the top right-singular vectors of the layer's input patches on a few
            target batches, set by ``segadapt.adapters.eva_init``; see ``eva.py``).
        use_rslora: s = alpha / sqrt(r) (rank-stabilised scaling).
        compute: ``"auto"`` picks weight space or activation space per layer from a cost model;
            ``"weight"`` / ``"activation"`` force one (activation falls back to weight where a layer
            has no activation form, or, without dropout, where its base weight requires grad).
        lora_rank: SALT: rank of the low-rank update on the remaining singular directions.
        salt_relu: SALT: clamp the r transformed top singular values at zero (the public SALT code
            applies relu to all of Sigma', including diag(sig_rest) + X Y; see ``salt.py``).
        ring_rank: TLoRA: tensor-ring rank of the transform T (its cost grows as ring_rank^3).
        tlora_max_factor: TLoRA: the largest factor used to factorise a dimension for the rings.
        nested_ranks: DyLoRA-style training (lora, conv_lora, lora_c, cp_lora and their DoRA forms):
            each training forward uses only the first b components, b ~ U{1..r} drawn per layer and
            call, with s = alpha / b, so that ``segadapt.adapters.truncate(model, k)`` later gives a
            working rank-k adapter for any k <= r. Eval mode uses all r.
    """

    method: str = "lora"
    rank: int = 8
    alpha: Optional[float] = None
    targets: Union[str, list[str]] = field(default_factory=list)
    exclude: Union[str, list[str]] = field(default_factory=list)
    train_modules: Optional[Union[str, list[str]]] = field(default_factory=list)
    norms: bool = False
    cap_rank: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    dropout: float = 0.0
    init: str = "default"
    use_rslora: bool = False
    compute: str = "auto"
    lora_rank: int = 8
    salt_relu: bool = True
    ring_rank: int = 2
    tlora_max_factor: int = 16
    nested_ranks: bool = False

    def __post_init__(self) -> None:
        # Hydra/OmegaConf hand over ListConfig/DictConfig; keep plain Python values.
        if not isinstance(self.targets, str):
            self.targets = [str(t) for t in self.targets]
        if not isinstance(self.exclude, str):
            self.exclude = [str(t) for t in self.exclude]
        if self.train_modules is None:
            self.train_modules = []
        elif not isinstance(self.train_modules, str):
            self.train_modules = [str(t) for t in self.train_modules]
        self.rank_pattern = {str(k): int(v) for k, v in dict(self.rank_pattern).items()}
        self.validate()

    def validate(self) -> None:
        """Check the values that do not depend on the model (the method name is checked by the registry)."""
        if int(self.rank) != self.rank or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        for pattern, rank in self.rank_pattern.items():
            if rank <= 0:
                raise ValueError(f"rank_pattern['{pattern}'] must be a positive integer, got {rank}")
        for flag in ("norms", "cap_rank"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.nested_ranks and self.init == "pissa":
            raise ValueError("nested_ranks and init='pissa' cannot be combined (the residual is the top-r part)")
        if self.dropout > 0 and self.compute == "weight":
            raise ValueError(f"dropout={self.dropout} needs activation space; compute='weight' would drop it silently (use 'auto')")
        if self.compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {self.compute!r}")
        if self.init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {self.init!r}")
        if self.lora_rank < 0 or self.ring_rank <= 0 or self.tlora_max_factor < 2:
            raise ValueError(
                f"lora_rank >= 0, ring_rank > 0 and tlora_max_factor >= 2 required, got "
                f"{self.lora_rank}, {self.ring_rank}, {self.tlora_max_factor}"
            )
        if not isinstance(self.targets, str) and not self.targets:
            raise ValueError("targets is empty: give a regex or a list of module-name suffixes")
        for where, pattern in [("targets", self.targets), ("exclude", self.exclude),
                               ("train_modules", self.train_modules)] + [("rank_pattern key", k) for k in self.rank_pattern]:
            if isinstance(pattern, str):
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(f"{where} {pattern!r} is not a valid regular expression: {error}") from None

    def scaling(self, rank: int) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA; 1 when alpha is None."""
        if self.alpha is None:
            return 1.0
        return float(self.alpha) / (rank**0.5 if self.use_rslora else rank)

    def rank_for(self, module_name: str) -> int:
        """The rank for one module, after ``rank_pattern`` overrides."""
        for pattern, rank in self.rank_pattern.items():
            if name_matches(module_name, [pattern]) or re.fullmatch(pattern, module_name):
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
    """True if ``name`` fullmatches a regex (a string) or ends with one of a list of suffixes
    (``name == suffix`` or ``name.endswith("." + suffix)``)."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in pattern)
