"""GGUF vocabularies <-> Hugging Face `tokenizers` tokenizers.

llama.cpp keeps a tokenizer as metadata: the token strings in id order, a type per token, and either BPE merges
(`gpt2`: byte-level BPE) or scores (`llama`: SentencePiece BPE with byte fallback), the special ids, and a name for
how text is split before BPE (`tokenizer.ggml.pre`). Import rebuilds a `tokenizers.Tokenizer` that splits and
merges as llama.cpp does; export reads a tokenizer.json back into those fields. Both directions work on plain data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from cairn.errors import ModelLoadError, UnsupportedModelError

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes as the original tokenizer.json files spell them (llama.cpp implements the same splits).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2() -> pre_tokenizers.PreTokenizer:
    """GPT-2's regex: 's|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+ (ByteLevel's own)."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    """llama.cpp's starcoder/smollm split: every digit alone (\\p{N}), then GPT-2's regex."""
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split(regex: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    return lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


@dataclass(frozen=True)
class PreFamily:
    """One way of splitting text before byte-level BPE, under the names llama.cpp gives it."""

    names: tuple[str, ...]
    """llama.cpp's `tokenizer.ggml.pre` values for it; the first is what export writes."""
    build: Callable[[], pre_tokenizers.PreTokenizer]
    """The equivalent `tokenizers` pre-tokenizer."""
    ignore_merges: bool = False
    """A piece that is a whole vocabulary token is taken as is, before any merge (llama.cpp: Llama 3)."""
    add_bos: bool = False
    """llama.cpp's BOS default when the file does not say."""


PRE_FAMILIES = (
    PreFamily(("gpt-2", "phi-2", "mpt", "olmo"), _gpt2),
    PreFamily(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), _digits_then_gpt2),
    PreFamily(("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral"), _split(_LLAMA3_SPLIT), True, True),
    PreFamily(("smaug-bpe", "dbrx"), _split(_LLAMA3_SPLIT)),
    PreFamily(("qwen2", "deepseek-r1-qwen", "megrez"), _split(_QWEN2_SPLIT)),
)


def pre_family(name: str | None) -> PreFamily:
    """The family of llama.cpp's pre-tokenizer `name`; a clear error for one cairn cannot rebuild."""
    for fam in PRE_FAMILIES:
        if name in fam.names:
            return fam
    known = ", ".join(n for f in PRE_FAMILIES for n in f.names)
    if name is None:
        raise UnsupportedModelError(f"the GGUF's gpt2 tokenizer has no tokenizer.ggml.pre, so how it splits text is "
                                    f"unknown; re-convert it with a current llama.cpp (cairn knows: {known})")
    raise UnsupportedModelError(f"unsupported GGUF pre-tokenizer {name!r}: cairn rebuilds {known}")


@cache
def _pre_json(build: Callable) -> str:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = build()
    return _canonical(json.loads(tok.to_str())["pre_tokenizer"])


def _canonical(pre: Any) -> str:
    """A pre-tokenizer's JSON with what does not change the split (offset trimming) left out."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "trim_offsets"}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return json.dumps(strip(pre), sort_keys=True)


def pre_name(pre_tokenizer: dict | None) -> str:
    """The llama.cpp pre-tokenizer name of a tokenizer.json `pre_tokenizer` (byte-level BPE), or a clear error."""
    have = _canonical(pre_tokenizer)
    for fam in PRE_FAMILIES:
        if _pre_json(fam.build) == have:
            return fam.names[0]
    raise UnsupportedModelError(
        f"cannot export this tokenizer to GGUF: llama.cpp has no pre-tokenizer known to split text like "
        f"{json.dumps(pre_tokenizer)[:200]} (cairn maps GPT-2, SmolLM/StarCoder, Llama 3 and Qwen2 splits)")


@cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet byte-level BPE vocabularies are spelled in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer fields of a GGUF file (tokenizer.ggml.* and tokenizer.chat_template)."""

    model: str
    """'gpt2' (byte-level BPE with merges) or 'llama' (SentencePiece BPE: scores, byte fallback)."""
    tokens: tuple[str, ...]
    """Token strings in id order."""
    token_types: tuple[int, ...]
    """llama.cpp token type per id (NORMAL, CONTROL, ...)."""
    merges: tuple[str, ...] = ()
    """gpt2: 'left right' merges, best first."""
    scores: tuple[float, ...] = ()
    """llama: a score per token; a pair whose concatenation scores higher merges first."""
    pre: str | None = None
    """gpt2: llama.cpp's name for how text is split before BPE."""
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    add_bos: bool | None = None
    """Prepend BOS when encoding a prompt; None: llama.cpp's default for this tokenizer."""
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    """llama: prepend a space to text (after each special token too, as llama.cpp does); None means yes."""
    chat_template: str | None = None

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> GGUFVocab:
        """From a GGUF's key -> value metadata (strings and lists already decoded)."""
        k = "tokenizer.ggml."
        model = meta.get(k + "model")
        if model not in ("gpt2", "llama"):
            raise UnsupportedModelError(
                f"unsupported GGUF tokenizer model {model!r}: cairn rebuilds 'gpt2' (byte-level BPE) and 'llama' "
                f"(SentencePiece BPE) vocabularies")
        tokens = meta.get(k + "tokens")
        if not tokens:
            raise ModelLoadError("the GGUF holds no tokenizer.ggml.tokens, so its tokenizer cannot be rebuilt")
        n = len(tokens)
        types = tuple(int(t) for t in meta.get(k + "token_type") or [NORMAL] * n)
        scores = tuple(float(s) for s in meta.get(k + "scores") or ())
        merges = tuple(meta.get(k + "merges") or ())
        if len(types) != n or (scores and len(scores) != n):
            raise ModelLoadError(f"the GGUF's tokenizer arrays disagree: {n} tokens, {len(types)} token types, "
                                 f"{len(scores)} scores")
        if model == "gpt2" and not merges:
            raise ModelLoadError("the GGUF's gpt2 tokenizer has no tokenizer.ggml.merges")
        if model == "llama" and not scores:
            raise ModelLoadError("the GGUF's llama tokenizer has no tokenizer.ggml.scores")

        def tid(name):
            v = meta.get(k + name)
            if v is None:
                return None
            if not 0 <= int(v) < n:
                raise ModelLoadError(f"tokenizer.ggml.{name} = {v} is not a token id (vocabulary of {n})")
            return int(v)

        return cls(
            model=model, tokens=tuple(tokens), token_types=types, merges=merges, scores=scores,
            pre=meta.get(k + "pre"), bos_id=tid("bos_token_id"), eos_id=tid("eos_token_id"),
            unk_id=tid("unknown_token_id"), pad_id=tid("padding_token_id"), eot_id=tid("eot_token_id"),
            eom_id=tid("eom_token_id"), add_bos=meta.get(k + "add_bos_token"), add_eos=meta.get(k + "add_eos_token"),
            add_space_prefix=meta.get(k + "add_space_prefix"), chat_template=meta.get("tokenizer.chat_template"),
        )

    def write(self, writer) -> None:
        """Add these fields to a gguf.GGUFWriter."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(list(self.tokens))
        writer.add_token_types(list(self.token_types))
        if self.merges:
            writer.add_token_merges(list(self.merges))
        if self.scores:
            writer.add_token_scores(list(self.scores))
        for value, add in ((self.bos_id, writer.add_bos_token_id), (self.eos_id, writer.add_eos_token_id),
                           (self.unk_id, writer.add_unk_token_id), (self.pad_id, writer.add_pad_token_id),
                           (self.eot_id, writer.add_eot_token_id), (self.eom_id, writer.add_eom_token_id)):
            if value is not None:
                add(value)
        if self.add_bos is not None:
            writer.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)

    def token(self, i: int | None) -> str | None:
        return None if i is None else self.tokens[i]

    def resolved_add_bos(self) -> bool:
        """Whether llama.cpp prepends BOS to a prompt (the file's flag, else its default for this tokenizer)."""
        if self.add_bos is not None:
            return bool(self.add_bos)
        return self.model == "llama" or pre_family(self.pre).add_bos

    def end_of_generation_ids(self) -> list[int]:
        """Ids that end a reply: EOS, EOT, EOM, and the control tokens llama.cpp treats as such by their text."""
        texts = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
                 "<|end_of_text|>"}
        ids = [i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None]
        ids += [i for i, (t, ty) in enumerate(zip(self.tokens, self.token_types)) if ty == CONTROL and t in texts]
        return list(dict.fromkeys(ids))


# ----- GGUF -> tokenizers


def build_tokenizer(v: GGUFVocab) -> HFTokenizer:
    """The `tokenizers` tokenizer that encodes as llama.cpp does with this vocabulary."""
    tok = _gpt2_tokenizer(v) if v.model == "gpt2" else _spm_tokenizer(v)
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(v.tokens, v.token_types)
               if ty in (CONTROL, UNKNOWN) and t]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(v.tokens, v.token_types)
            if ty == USER_DEFINED and t]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    post = [processors.ByteLevel(trim_offsets=False)] if v.model == "gpt2" else []
    template = _template(v)
    if template is not None:
        post.append(template)
    if post:
        tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    return tok


def _vocab(tokens: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, t in enumerate(tokens):
        out.setdefault(t, i)  # a repeated string keeps its first id, as llama.cpp's text -> id map does
    return out


def _gpt2_tokenizer(v: GGUFVocab) -> HFTokenizer:
    fam = pre_family(v.pre)
    alphabet = set(byte_alphabet().values())
    spell = byte_alphabet()
    tokens = [
        t if ty != NORMAL or set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))
        for t, ty in zip(v.tokens, v.token_types)
    ]
    merges = []
    for m in v.merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ModelLoadError(f"the GGUF's tokenizer merge {m!r} is not two tokens separated by a space")
        merges.append((parts[0], parts[1]))
    try:
        model = models.BPE(_vocab(tokens), merges, ignore_merges=fam.ignore_merges)
    except Exception as e:  # tokenizers raises a bare Exception for a merge naming an unknown token
        raise ModelLoadError(f"the GGUF's BPE merges do not fit its vocabulary: {e}") from None
    tok = HFTokenizer(model)
    tok.pre_tokenizer = fam.build()
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_tokenizer(v: GGUFVocab) -> HFTokenizer:
    vocab = _vocab(list(v.tokens))
    merges = spm_merges(vocab, dict(zip(v.tokens, v.scores)))
    unk = v.token(v.unk_id)
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = v.add_space_prefix is not False
    steps = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def spm_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's scored merging: every split of a token into two vocabulary tokens,
    best-scoring result first (ties: shorter left part, then vocabulary order), as transformers derives them."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _template(v: GGUFVocab) -> processors.TemplateProcessing | None:
    bos = v.token(v.bos_id) if v.resolved_add_bos() else None
    eos = v.token(v.eos_id) if v.add_eos else None
    if bos is None and eos is None:
        return None
    pre, post = ([f"{bos}:0"] if bos else []), ([f"{eos}:0"] if eos else [])
    pair_pre, pair_post = ([f"{bos}:1"] if bos else []), ([f"{eos}:1"] if eos else [])
    special = [(t, i) for t, i in ((bos, v.bos_id), (eos, v.eos_id)) if t is not None]
    return processors.TemplateProcessing(
        single=[*pre, "$A:0", *post], pair=[*pre, "$A:0", *post, *pair_pre, "$B:1", *pair_post],
        special_tokens=list(dict.fromkeys(special)))


def tokenizer_config(v: GGUFVocab, model_max_length: int) -> dict:
    """tokenizer_config.json for the rebuilt tokenizer: special tokens, BOS/EOS behaviour, chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": v.token(v.bos_id),
        "eos_token": v.token(v.eos_id),
        "unk_token": v.token(v.unk_id),
        "pad_token": v.token(v.pad_id),
        "add_bos_token": v.resolved_add_bos(),
        "add_eos_token": bool(v.add_eos),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": v.chat_template,
    }


# ----- tokenizer.json -> GGUF


def vocab_from_tokenizer(tj: dict, config: dict, vocab_size: int, bos_id: int | None = None,
                         eos_id: int | None = None) -> GGUFVocab:
    """The GGUF fields for a tokenizer.json (`tj`) and its tokenizer_config.json (`config`), padded to the
    model's `vocab_size` rows with unused '[PADn]' tokens as llama.cpp's converter does."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"cannot export a {model.get('type')!r} tokenizer to GGUF; cairn exports BPE "
                                    f"tokenizers (byte-level, or SentencePiece-style with byte fallback)")
    spm = bool(model.get("byte_fallback"))
    ids: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    special: dict[int, bool] = {}
    for a in tj.get("added_tokens") or []:
        ids[int(a["id"])] = a["content"]
        special[int(a["id"])] = bool(a.get("special"))
    if max(ids, default=-1) >= vocab_size:
        raise UnsupportedModelError(f"the tokenizer has token id {max(ids)}, beyond the model's {vocab_size} "
                                    f"embedding rows; llama.cpp needs every token to have a row")
    tokens, types = [], []
    for i in range(vocab_size):
        t = ids.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in special:
            tokens.append(t)
            types.append(CONTROL if special[i] else USER_DEFINED)
        elif spm and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            tokens.append(t)
            types.append(BYTE)
        else:
            tokens.append(t)
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if any(len(m.split(" ")) != 2 for m in merges):
        raise UnsupportedModelError("cannot export this tokenizer to GGUF: a merge holds a token with a space")
    lookup = {t: i for i, t in reversed(list(enumerate(tokens)))}

    def tid(name: str, fallback: int | None) -> int | None:
        v = config.get(name)
        v = v.get("content") if isinstance(v, dict) else v
        return lookup.get(v, fallback) if v is not None else fallback

    unk = tid("unk_token", lookup.get(model.get("unk_token")) if model.get("unk_token") else None)
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        add_bos = _post_processor_adds_bos(tj.get("post_processor"))
    common = {
        "tokens": tuple(tokens), "bos_id": tid("bos_token", bos_id), "eos_id": tid("eos_token", eos_id), "unk_id": unk,
        "pad_id": tid("pad_token", None), "add_bos": bool(add_bos), "add_eos": bool(config.get("add_eos_token", False)),
        "chat_template": config.get("chat_template") or None,
    }
    if not spm:
        return GGUFVocab(model="gpt2", token_types=tuple(types), merges=tuple(merges),
                         pre=pre_name(tj.get("pre_tokenizer")), **common)
    if unk is not None:
        types[unk] = UNKNOWN
    return GGUFVocab(model="llama", token_types=tuple(types), scores=tuple(_spm_scores(tokens, merges)),
                     add_space_prefix=_spm_adds_prefix(tj), **common)


def _spm_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Scores that make llama.cpp's SentencePiece merging follow the merge list: a token made by merge r scores -r."""
    score = {}
    for r, m in enumerate(merges):
        score.setdefault(m.replace(" ", ""), -float(r))
    return [score.get(t, 0.0) for t in tokens]


def _spm_adds_prefix(tj: dict) -> bool:
    text = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    return '"Metaspace"' in text and '"prepend_scheme": "never"' not in text and '"add_prefix_space": false' not in text


def _post_processor_adds_bos(post: dict | None) -> bool:
    if not post:
        return False
    if post.get("type") == "Sequence":
        return any(_post_processor_adds_bos(p) for p in post.get("processors") or [])
    return post.get("type") == "TemplateProcessing" and "SpecialToken" in (post.get("single") or [{}])[0]
