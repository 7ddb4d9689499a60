"""The expert bank: a frozen base model carrying a growing list of LoRA experts.

An :class:`ExpertBank` wraps a model once (replacing the target modules with
:class:`~moe_lora.layers.LoRALayer`) and then grows: ``add_expert``, ``freeze``, ``remove_expert``.
Experts are addressed by name; their bank index (the position used in routing tensors) is
``bank.index(name)``. Every forward reads the routing set with ``bank.use(...)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_lora.core.config import ExpertConfig
from moe_lora.core.identity import base_fingerprint, check_base, layer_shapes
from moe_lora.core.io import CorruptFileError
from moe_lora.core.layers import LoRALayer, RoutingContext
from moe_lora.core.names import check_expert_name
from moe_lora.core.routing import Routing, check_routing_values
from moe_lora.core.storage import read_bank, read_manifest, write_bank
from moe_lora.core.targets import resolve_targets

__all__ = ["ExpertBank", "ExpertInfo"]


@dataclass
class ExpertInfo:
    """Metadata of one expert (saved in the bank's manifest).

    Attributes:
        name: unique name in the bank.
        config: the expert's hyper-parameters.
        task: the task it was trained for (any JSON scalar), if any.
        created: ISO-8601 UTC creation time.
        trainable: whether it currently receives gradients.
        meta: free-form JSON metadata.
    """

    name: str
    config: ExpertConfig
    task: Any = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    trainable: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["config"] = asdict(self.config)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ExpertInfo:
        """Inverse of :meth:`to_json`."""
        d = dict(d)
        d["config"] = ExpertConfig(**d["config"])
        return cls(**d)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


class ExpertBank(nn.Module):
    """A frozen base model with LoRA experts injected into its ``targets``.

    Args:
        model: any ``nn.Module``; its parameters are frozen. It is modified in place.
        targets: which modules get experts (see :mod:`moe_lora.core.targets`).
        base_id: a name for the base model, recorded in saved banks (e.g. ``"minilm"``).

    Raises:
        ValueError: ``targets`` select nothing or an unsupported module (lists what exists).

    :meth:`unload` gives the original model back.
    """

    def __init__(
        self, model: nn.Module, targets: str | Sequence[str] = "auto", base_id: str | None = None
    ):
        super().__init__()
        _refuse_wrapped(model)
        self.model = model
        self._grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        self.base_id = base_id or type(model).__name__
        self.ctx = RoutingContext()
        self.layers: dict[str, LoRALayer] = {}
        for path in resolve_targets(model, targets):
            layer = LoRALayer(model.get_submodule(path), self.ctx, path)
            _set_submodule(model, path, layer)
            self.layers[path] = layer
        self._experts: list[ExpertInfo] = []
        self._positions: dict[str, int] = {}  # name -> bank index, rebuilt on every change
        self._merged: dict[str, float] | None = None
        self._unloaded = False

    # ------------------------------------------------------------------ experts
    @property
    def names(self) -> list[str]:
        """Expert names in bank order (index i is routing column i)."""
        return [e.name for e in self._experts]

    def __len__(self) -> int:
        return len(self._experts)

    def __contains__(self, name: object) -> bool:
        return name in self._positions

    def index(self, name: str) -> int:
        """Bank index of expert ``name``.

        Raises:
            KeyError: no such expert (the message lists the names).
        """
        i = self._positions.get(name)
        if i is None:
            raise KeyError(f"no expert named {name!r}; the bank has {self.names}")
        return i

    def info(self, name: str) -> ExpertInfo:
        """Metadata of expert ``name``."""
        return self._experts[self.index(name)]

    @property
    def experts(self) -> list[ExpertInfo]:
        """Metadata of all experts in bank order (a copy of the list)."""
        return list(self._experts)

    def add_expert(
        self,
        name: str,
        config: ExpertConfig | None = None,
        *,
        task: Any = None,
        trainable: bool = True,
        meta: dict[str, Any] | None = None,
    ) -> int:
        """Add an expert to every LoRA layer and return its bank index.

        Raises:
            ValueError: the name is taken or invalid (see :mod:`moe_lora.core.names`: letters,
                digits, ``-``, ``_``, ``.``; not ``.`` or ``..``; at most 128 characters).
            RuntimeError: the bank is merged or unloaded.
        """
        check_expert_name(name)
        if name in self._positions:
            raise ValueError(f"an expert named {name!r} already exists")
        self._refuse_if_merged("add_expert")
        cfg = config or ExpertConfig()
        for layer in self.layers.values():
            layer.add(cfg).requires_grad_(trainable)
        self._experts.append(
            ExpertInfo(name=name, config=cfg, task=task, trainable=trainable, meta=dict(meta or {}))
        )
        self._changed()
        return len(self._experts) - 1

    def remove_expert(self, name: str) -> None:
        """Remove expert ``name``; the indices of later experts shift down by one.

        The routing in force (and any routing :meth:`use` restores later) was made for the old
        indices: a forward under it raises until a routing is set again.
        """
        self._refuse_if_merged("remove_expert")
        i = self.index(name)
        for layer in self.layers.values():
            layer.remove(i)
        del self._experts[i]
        self.ctx.layout += 1
        self._changed()

    def freeze(self, name: str | None = None) -> None:
        """Stop gradients to expert ``name`` (all experts when None)."""
        self._set_trainable(name, False)

    def unfreeze(self, name: str) -> None:
        """Let expert ``name`` receive gradients again."""
        self._set_trainable(name, True)

    def _set_trainable(self, name: str | None, flag: bool) -> None:
        ids = range(len(self)) if name is None else [self.index(name)]
        for i in ids:
            for layer in self.layers.values():
                layer.experts[i].requires_grad_(flag)
            self._experts[i].trainable = flag
        self._changed()

    def _changed(self) -> None:
        self.ctx.version += 1
        self._positions = {e.name: i for i, e in enumerate(self._experts)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive gradients: trainable experts' factors and attached gates."""
        return [p for layer in self.layers.values() for p in layer.parameters() if p.requires_grad]

    def expert_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Expert ``name``'s factors keyed ``"<layer path>.lora_A"`` / ``".lora_B"``."""
        i = self.index(name)
        out: dict[str, nn.Parameter] = {}
        for path, layer in self.layers.items():
            f = layer.experts[i]
            out[f"{path}.lora_A"], out[f"{path}.lora_B"] = f.lora_A, f.lora_B
        return out

    def expert_state(self, name: str) -> dict[str, Tensor]:
        """Detached copies of :meth:`expert_parameters`."""
        return {k: v.detach().clone() for k, v in self.expert_parameters(name).items()}

    @torch.no_grad()
    def set_expert_state(self, name: str, tensors: Mapping[str, Tensor]) -> None:
        """Copy ``tensors`` (as from :meth:`expert_state`) into expert ``name``.

        Raises:
            ValueError: a key is missing or unexpected, or a shape differs (names the key).
        """
        params = self.expert_parameters(name)
        missing, extra = set(params) - set(tensors), set(tensors) - set(params)
        if missing or extra:
            raise ValueError(
                f"expert {name!r}: state keys differ; missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(extra)[:3]}"
            )
        for key, p in params.items():
            t = tensors[key]
            if t.shape != p.shape:
                raise ValueError(
                    f"expert {name!r}: {key} has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(t.to(p.dtype))
        self._changed()

    # ------------------------------------------------------------------ routing
    def _check(self, routing: Routing) -> Routing:
        """``routing`` if its experts exist in this bank (one host sync for index tensors).

        Raises:
            RuntimeError: the bank is merged or unloaded and the routing names experts, or the
                routing was stamped (:meth:`Routing.for_layout`) for an older layout.
            IndexError / ValueError: see :func:`moe_lora.core.routing.check_routing_values`.
        """
        if routing.kind in ("base", "gated"):
            return routing
        self._refuse_if_unloaded("route to experts")
        if self._merged is not None:
            raise RuntimeError("the bank is merged; call unmerge() before routing to experts")
        if routing.layout is not None and routing.layout != self.ctx.layout:
            raise RuntimeError(
                "this routing was built before an expert was removed from the bank, so its "
                "indices name other experts now; ask the router for a new routing"
            )
        check_routing_values(routing, len(self))
        return routing

    def as_routing(self, spec: Routing | str | int | None) -> Routing:
        """Normalise a routing spec: a :class:`Routing`, an expert name or index, or None (base).

        Raises:
            KeyError: an unknown expert name.
            ValueError: an index that is not an integer.
        """
        if spec is None:
            return Routing.base()
        if isinstance(spec, str):
            return Routing.single(self.index(spec))
        if isinstance(spec, Routing):
            return spec
        return Routing.single(spec)

    @contextlib.contextmanager
    def use(self, routing: Routing | str | int | None) -> Iterator[ExpertBank]:
        """Route the forwards inside the ``with`` block by ``routing``; restores the previous one."""
        previous = self.ctx.routing, self.ctx.routing_layout
        self.set_routing(routing)
        try:
            yield self
        finally:
            self.ctx.routing, self.ctx.routing_layout = previous

    def set_routing(self, routing: Routing | str | int | None) -> None:
        """Set the routing for subsequent forwards (prefer :meth:`use`).

        Raises:
            IndexError / ValueError: an expert index is out of range or not an integer, dense
                weights have a column count other than the number of experts.
            RuntimeError: the bank is merged or unloaded.
        """
        self.ctx.routing = self._check(self.as_routing(routing))
        self.ctx.routing_layout = self.ctx.layout

    @property
    def routing(self) -> Routing:
        """The routing currently applied."""
        return self.ctx.routing

    def forward(self, *args: Any, routing: Routing | str | int | None = None, **kwargs: Any) -> Any:
        """Run the wrapped model, under ``routing`` when given (else the current routing)."""
        if routing is None:
            return self.model(*args, **kwargs)
        with self.use(routing):
            return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ gates
    def attach_gates(self, factory: Any) -> None:
        """Give every LoRA layer a gate: ``factory(path, layer) -> nn.Module`` (a LayerGate).

        Gates act under ``Routing.gated()``; their parameters are trainable.
        """
        for path, layer in self.layers.items():
            layer.gate = factory(path, layer)

    def detach_gates(self) -> None:
        """Remove all layer gates."""
        for layer in self.layers.values():
            layer.gate = None

    def pop_aux_loss(self) -> Tensor:
        """Mean auxiliary loss over the gated layers since the last pop (0 when none).

        Only forwards run with autograd on report one; ``torch.no_grad()`` forwards (inference,
        serving) keep nothing, so they need no pop.
        """
        losses, self.ctx.aux_losses = self.ctx.aux_losses, []
        if not losses:
            return torch.zeros(())
        return torch.stack([loss.reshape(()) for loss in losses]).mean()

    # ------------------------------------------------------------------ merge
    def merge(self, weights: Mapping[str, float] | str) -> None:
        """Fold ``sum_e w_e * s_e B_e A_e`` into the base weights (``weights``: name -> weight).

        After merging, plain forwards (routing ``base``) include the experts at no extra cost.
        """
        if self._merged is not None:
            raise RuntimeError("already merged; call unmerge() first")
        w = {weights: 1.0} if isinstance(weights, str) else dict(weights)
        by_index = {self.index(n): float(v) for n, v in w.items()}
        for layer in self.layers.values():
            layer.merge(by_index)
        self._merged = w

    def unmerge(self) -> None:
        """Undo :meth:`merge` (no-op when nothing is merged)."""
        for layer in self.layers.values():
            layer.unmerge()
        self._merged = None

    @property
    def merged(self) -> dict[str, float] | None:
        """The merged combination, or None."""
        return None if self._merged is None else dict(self._merged)

    def _refuse_if_merged(self, what: str) -> None:
        self._refuse_if_unloaded(what)
        if self._merged is not None:
            raise RuntimeError(f"cannot {what} while merged; call unmerge() first")

    def _refuse_if_unloaded(self, what: str) -> None:
        if self._unloaded:
            raise RuntimeError(f"cannot {what}: the bank was unloaded (unload())")

    def clear_cache(self) -> None:
        """Free every layer's cached frozen stack."""
        for layer in self.layers.values():
            layer.clear_cache()

    # ------------------------------------------------------------------ storage
    def _base_modules(self) -> dict[str, nn.Module]:
        return {p: layer.base for p, layer in self.layers.items()}

    def base_fingerprint(self) -> str:
        """SHA-256 of the base architecture and of every target layer's weight and bias (see
        :mod:`moe_lora.core.identity`); identifies the pretrained base a saved bank belongs to."""
        return base_fingerprint(self.model, self._base_modules())

    def save(self, path: str | Path, names: Sequence[str] | None = None) -> Path:
        """Save experts (all, or ``names``) as one new committed version of folder ``path``
        (see :mod:`moe_lora.core.storage`); returns ``path``.

        Raises:
            RuntimeError: the bank is merged (the base weights would not identify the base model)
                or unloaded.
            KeyError: a name is not in the bank.
            moe_lora.core.commit.LockTimeoutError: another process kept the folder locked.
        """
        self._refuse_if_merged("save")
        chosen = list(self.names if names is None else names)
        tensors: dict[str, Tensor] = {}
        for name in chosen:
            for key, t in self.expert_parameters(name).items():
                layer_path, _, which = key.rpartition(".")
                tensors[f"{name}/{layer_path}/{which}"] = t
        manifest = {
            "base": {"id": self.base_id, "class": type(self.model).__name__,
                     "fingerprint": self.base_fingerprint()},
            "layers": layer_shapes(self._base_modules()),
            "experts": [self.info(n).to_json() for n in chosen],
        }
        return write_bank(path, manifest, tensors)

    def save_expert(self, name: str, path: str | Path) -> Path:
        """Save one expert to folder ``path`` (the bank format with a single expert)."""
        return self.save(path, [name])

    def load_experts(
        self, path: str | Path, names: Sequence[str] | None = None, *, strict_base: bool = True
    ) -> list[int]:
        """Add the experts saved in folder ``path`` (all, or ``names``); returns their indices.

        All or nothing: everything is read and checked first, and on any error the bank is left
        as it was.

        Raises:
            FileNotFoundError / CorruptFileError: missing, truncated or modified files.
            ValueError: base model, layer or tensor shapes disagree; a name is missing or taken.
            RuntimeError: the bank is merged or unloaded.
        """
        self._refuse_if_merged("load experts")
        folder = Path(path)
        manifest, states = read_bank(folder)
        check_base(manifest, self.model, self._base_modules(), folder, strict_base)
        return self._add_saved(_saved_experts(manifest, states, folder, names), folder)

    def _add_saved(self, saved: list[_Saved], folder: Path) -> list[int]:
        taken = [info.name for info, _ in saved if info.name in self]
        if taken:
            raise ValueError(f"{folder}: the bank already has expert(s) named {taken}")
        added: list[str] = []
        try:
            for info, state in saved:
                self.add_expert(info.name, info.config, task=info.task, trainable=info.trainable,
                                meta=info.meta)
                added.append(info.name)
                self.set_expert_state(info.name, state)
                now = self.info(info.name)
                now.created = info.created
        except BaseException:
            for name in reversed(added):
                self.remove_expert(name)
            raise
        return [self.index(info.name) for info, _ in saved]

    def load_expert(self, path: str | Path, name: str | None = None) -> int:
        """Add one saved expert (the folder's only one, or ``name``); returns its index.

        Raises:
            ValueError: the folder holds several experts and ``name`` is None; as
                :meth:`load_experts`.
        """
        if name is None and len(read_manifest(path)["experts"]) != 1:
            raise ValueError(f"{path}: holds several experts; pass name= to pick one")
        return self.load_experts(path, None if name is None else [name])[0]

    @classmethod
    def load(
        cls, path: str | Path, model: nn.Module, *, strict_base: bool = True
    ) -> ExpertBank:
        """Wrap ``model`` with the targets saved in ``path`` and load all its experts.

        Files, base identity and tensor shapes are all checked before ``model`` is touched; if
        loading fails after that, the model is unwrapped again (:meth:`unload`).

        Raises:
            ValueError: the base model differs from the one the bank was saved with, or it
                already carries LoRA layers.
            FileNotFoundError / CorruptFileError: a file is missing, truncated, modified or
                unparsable.
        """
        _refuse_wrapped(model)
        folder = Path(path)
        manifest, states = read_bank(folder)
        targets = list(manifest["layers"])
        modules = {p: model.get_submodule(p) for p in resolve_targets(model, targets)}
        check_base(manifest, model, modules, folder, strict_base)
        saved = _saved_experts(manifest, states, folder, None)
        bank = cls(model, targets=targets, base_id=str(manifest["base"].get("id")))
        try:
            bank._add_saved(saved, folder)
        except BaseException:
            bank.unload()
            raise
        return bank

    def unload(self) -> nn.Module:
        """Give the original model back and empty the bank, which cannot be used afterwards.

        Every target module is put back in place of its LoRA layer, a merged update is
        subtracted from the base weights (up to rounding) and the parameters' ``requires_grad``
        flags are restored as they were before wrapping.

        Raises:
            RuntimeError: the bank was already unloaded.
        """
        self._refuse_if_unloaded("unload")
        self.unmerge()
        for path, layer in self.layers.items():
            _set_submodule(self.model, path, layer.base)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._grad_flags.get(n, False))
        self.layers, self._experts, self._unloaded = {}, [], True
        self.ctx.layout += 1
        self._changed()
        return self.model


_Saved = tuple[ExpertInfo, dict[str, Tensor]]


def _refuse_wrapped(model: nn.Module) -> None:
    if any(isinstance(m, LoRALayer) for m in model.modules()):
        raise ValueError("model already carries LoRA layers; wrap the original model once")


def _saved_experts(
    manifest: dict[str, Any], states: dict[str, dict[str, Tensor]], folder: Path,
    names: Sequence[str] | None,
) -> list[_Saved]:
    """The wanted experts' infos and factors (all when ``names`` is None), in saved order.

    Raises:
        ValueError: a name in ``names`` is not saved in the folder.
        CorruptFileError: an expert entry does not make an :class:`ExpertInfo`.
    """
    missing = [n for n in names or [] if n not in states]
    if missing:
        raise ValueError(f"{folder}: no expert(s) {missing}; it holds {list(states)}")
    try:
        infos = [ExpertInfo.from_json(d) for d in manifest["experts"]]
    except (TypeError, ValueError) as err:
        raise CorruptFileError(f"{folder}: malformed expert entry in the manifest ({err})") from err
    wanted = set(states if names is None else names)
    return [(i, states[i.name]) for i in infos if i.name in wanted]
