"""The model names a server answers to: one rule for every kind.

- A real model's name is its directory's (or file's) name, or what `--served-name` gives it.
- A virtual name puts something in front of real models, and is one of two forms:
  - a plain name chosen by what is in front: a router's `name` (`auto` by default) and the `requested` aliases
    of its rules; the router picks which real model answers;
  - `MODEL+FEATURE`: the real model MODEL with a feature in front of it (`smollm2+rag`: retrieval first).
- `+` is kept for the second form: no real or plain virtual name contains it. No virtual name equals a real one,
  and no two virtual names are equal.

GET /v1/models lists every name; a virtual one's `owned_by` says what answers it (e.g. `cairn-router`). A response
always names the real model that produced it (its `model` field and the `x-cairn-model` header)."""

from __future__ import annotations

from cairn.errors import UserError


def check(real: list[str], virtual: dict[str, str]) -> None:
    """Raise a UserError unless `real` names and `virtual` names (name -> what is in front of it) follow the rule."""
    for name in real:
        if "+" in name:
            raise UserError(f"served model name {name!r} contains '+', which is kept for MODEL+FEATURE names; "
                            "give it another with --served-name", param="served_name")
    for name, owner in virtual.items():
        if name in real:
            raise UserError(f"{owner} would answer to {name!r}, which is already a served model's name; rename one",
                            param="router")
        base, plus, feature = name.partition("+")
        if plus and (base not in real or not feature):
            raise UserError(f"{owner}: {name!r} must be MODEL+FEATURE with MODEL a served model ({', '.join(real)})",
                            param="router")
