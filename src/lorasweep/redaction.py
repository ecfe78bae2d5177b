"""What is secret, and masked copies of whatever carries a config out of the process.

A key is secret by its name (the last part of its path), matched as whole words, so that
`tokenizer_name_or_path` is not a secret but `hub_token`, `HF_TOKEN` and `apiKey` are:
- its last word is `token`, unless the word before names a text token (`pad_token`, `null_token`);
- it has the word `password`, `passwd`, `secret`, `credential(s)`, or `apikey`;
- it has the words `api key`, `access key` or `private key` in a row;
- it contains one of `tracking.secret_keys` (names given by the user), matched as words too.

A secret's value is replaced by `MASK`, except a value that is one `${...}` interpolation without a
default (say `${oc.env:HF_TOKEN}`): that names where the secret comes from, not the secret, and
keeping it lets a saved config be reloaded without the secret.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

MASK = "****"

SECRET_WORDS = frozenset({"password", "passwd", "secret", "credential", "credentials", "apikey"})
SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key")})
# `<word>_token` holding text, not a credential: special tokens and data.null_token.
TEXT_TOKENS = frozenset({"pad", "bos", "eos", "unk", "sep", "cls", "mask", "null"})
# tracking.secret_keys holds names of secrets, not secrets.
NOT_SECRET = frozenset({("secret", "keys")})
# One interpolation with no default: a default (`${oc.env:X,abc}`) could be the secret itself.
INTERPOLATION = re.compile(r"^\$\{[^${},]*\}$")


def key_words(name: str) -> list[str]:
    """`training.extra.hubToken` -> ['hub', 'token']: the last path part, split into words."""
    leaf = str(name).rsplit(".", 1)[-1]
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", leaf)
    return [w for w in re.split(r"[^0-9a-zA-Z]+", spaced.lower()) if w]


def is_secret_key(name: str, extra: Iterable[str] = ()) -> bool:
    words = key_words(name)
    if not words or tuple(words) in NOT_SECRET:
        return False
    if words[-1] == "token" and (len(words) == 1 or words[-2] not in TEXT_TOKENS):
        return True
    pairs = zip(words, words[1:], strict=False)  # each word with the next
    if SECRET_WORDS.intersection(words) or SECRET_PAIRS.intersection(pairs):
        return True
    return any(_contains(words, key_words(e)) for e in extra)


def _contains(words: Sequence[str], part: Sequence[str]) -> bool:
    n = len(part)
    return n > 0 and any(list(words[i:i + n]) == list(part) for i in range(len(words) - n + 1))


def mask_value(value: Any) -> Any:
    """MASK for a secret's value; empty values and an interpolation are kept."""
    if value in (None, "") or (isinstance(value, str) and INTERPOLATION.match(value)):
        return value
    return MASK


def masked_container(cfg: DictConfig, extra: Iterable[str] = (), resolve: bool = True) -> Any:
    """The config as plain dicts/lists with every secret masked. With `resolve`, values are
    resolved, except a secret given as an interpolation, which stays one."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    resolved = OmegaConf.to_container(cfg, resolve=True) if resolve else raw
    return _mask_tree(raw, resolved, tuple(extra), secret=False)


def _mask_tree(raw: Any, resolved: Any, extra: tuple, secret: bool) -> Any:
    if isinstance(resolved, dict):
        return {k: _mask_tree(raw.get(k) if isinstance(raw, dict) else None, v, extra,
                              secret or is_secret_key(k, extra)) for k, v in resolved.items()}
    if isinstance(resolved, list):
        return [_mask_tree(raw[i] if isinstance(raw, list) and i < len(raw) else None, v,
                           extra, secret) for i, v in enumerate(resolved)]
    if not secret:
        return resolved
    if isinstance(raw, str) and INTERPOLATION.match(raw):
        return raw
    return mask_value(resolved)


def override_key(override: str) -> str:
    """`+training.extra.hub_token=x` -> `training.extra.hub_token` (`@package` dropped)."""
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def mask_override(override: str, extra: Iterable[str] = ()) -> str:
    """A Hydra override (`[+|++|~]key=value`) with a secret key's value masked."""
    if "=" not in override or not is_secret_key(override_key(override), extra):
        return override
    head, value = override.split("=", 1)
    return f"{head}={mask_value(value)}"


def mask_overrides(overrides: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    extra = tuple(extra)
    return [mask_override(str(o), extra) for o in overrides]
