"""`cairn synth`: a teacher writes instruction data. Three sources of instructions:
  seeds          each line of --seeds is a topic ("the water cycle"; the teacher writes questions about it) or,
                 as JSONL {"instruction": ...}, a task taken as it is;
  docs           passages of the files in --from-docs; the teacher writes a question each passage answers, then
                 answers it with the passage in the prompt (grounded question answering);
  self-instruct  the teacher invents the instruction itself: it is given only its chat template's opening of a
                 user turn and writes the user's message (Magpie), then answers it.
Every request goes through the LLM's engine: `batch` tasks are in flight at once, so their requests decode
together (a pool-served teacher, or several copies of it, works the same way). Kept examples are chat JSONL
records that `cairn train --recipe sft` (or distill) reads, each with an "id" and its provenance under "meta".
Dropped ones are counted by reason.

Resumable: OUT gets the kept records and OUT.progress one line per finished task (kept or the reason it was
dropped), both appended and fsynced 16 finished tasks at a time; a restarted run skips every finished task,
rebuilds the duplicate index, and repairs a line a kill cut short. No duplicates, nothing lost."""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cairn.config import SamplingParams
from cairn.data.dedup import DedupIndex
from cairn.data.filters import answer_problem, clean_instruction, instruction_problem
from cairn.errors import UserError

Mode = Literal["seeds", "docs", "self-instruct"]
TOPIC_PROMPT = "Write a question about {topic}."
DOC_QUESTION_PROMPT = ("{passage}\n\nWrite one question that the text above answers. Write only the question.")
DOC_ANSWER_PROMPT = "{passage}\n\nAnswer using the text above. {question}"
_SENTINEL = "\u2063cairn-user-turn\u2063"


@dataclass(frozen=True)
class SynthConfig:
    """How `cairn synth` asks and filters."""

    mode: Mode
    """Where instructions come from: seeds, docs or self-instruct."""
    per_source: int = 1
    """Instructions to ask for per seed topic or per document passage."""
    count: int = 100
    """self-instruct: ask until this many examples are kept (at most 4x as many asked; tasks in flight then finish
    and are kept too)."""
    temperature: float = 0.7
    """Sampling temperature of instructions and answers."""
    top_p: float = 0.95
    """Nucleus sampling of instructions and answers."""
    max_tokens: int = 256
    """Longest answer in tokens; an answer cut there is dropped as truncated."""
    instruction_tokens: int = 64
    """Longest teacher-written instruction in tokens."""
    seed: int = 0
    """Seeds every request (each task's seed derives from it and the task's id)."""
    batch: int = 64
    """Tasks in flight at once (each its own chain of requests); a few times the engine's concurrency keeps it
    full. Finished tasks are written 16 at a time (the unit of progress a kill can lose)."""
    min_chars: int = 8
    """Shorter instructions or answers are dropped."""
    max_chars: int = 4000
    """Longer instructions or answers are dropped."""
    near_dup_ngram: int = 3
    """Word n-grams of the near-duplicate check on instructions (MinHash LSH, ~75% Jaccard)."""
    judge_min: int | None = None
    """When set, the teacher rates each answer 1-5 (cairn.eval.judge) and ones below this are dropped."""
    save_logits: int = 0
    """When > 0, the teacher's top-K logprobs of every kept record go to OUT.logits/ (for offline distillation)."""
    chunk_chars: int = 1200
    """docs: passage length in characters (split at paragraph, then sentence boundaries)."""
    system: str | None = None
    """A system message for the answers (not written into the records)."""

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}


@dataclass(frozen=True)
class Task:
    key: str
    """Stable id: the same seed file and settings give the same keys, so a restart knows what is done."""
    source: str | None = None
    """The seed topic or the document passage (None for self-instruct)."""
    origin: str | None = None
    """Where the source came from (file:line, file#chunk)."""
    instruction: str | None = None
    """A given instruction (seed tasks); None means the teacher writes it."""


@dataclass
class SynthStats:
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    skipped: int = 0
    """Tasks a previous run finished."""
    generated_tokens: int = 0
    seconds: float = 0.0


# --- tasks -------------------------------------------------------------------------------------------------------


def _digest(text: str) -> str:
    return f"{zlib.crc32(text.encode()):08x}"


def read_seeds(path: str | Path) -> list[tuple[str, dict]]:
    """(file:line, {"topic": ...} or {"instruction": ...}) for every non-empty line: plain text is a topic; JSONL
    lines give "instruction" (a task) or "topic"."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"seeds file {p} does not exist", param="seeds")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if p.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise UserError(f"{p}:{i}: malformed JSON ({e})", param="seeds") from None
            if not isinstance(rec, dict) or not any(isinstance(rec.get(k), str) for k in ("instruction", "topic")):
                raise UserError(f'{p}:{i}: expected an object with an "instruction" or a "topic" string',
                                param="seeds")
            out.append((f"{p.name}:{i}", rec))
        else:
            out.append((f"{p.name}:{i}", {"topic": line}))
    if not out:
        raise UserError(f"seeds file {p} has no seeds", param="seeds")
    return out


def seed_tasks(seeds: list[tuple[str, dict]], per_source: int) -> list[Task]:
    tasks: dict[str, Task] = {}  # a seed given twice is one task
    for where, rec in seeds:
        if isinstance(rec.get("instruction"), str):
            t = Task(f"t-{_digest(rec['instruction'])}", None, where, rec["instruction"])
            tasks.setdefault(t.key, t)
        else:
            for j in range(per_source):
                t = Task(f"s-{_digest(rec['topic'])}-{j}", rec["topic"], where)
                tasks.setdefault(t.key, t)
    return list(tasks.values())


def passages(text: str, chunk_chars: int) -> list[str]:
    """Paragraph-aligned passages of about chunk_chars (a paragraph longer than that is split at sentences)."""
    pieces: list[str] = []
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        if len(para) <= chunk_chars:
            pieces.append(para)
            continue
        sentence = ""
        for s in para.replace("\n", " ").split(". "):
            if sentence and len(sentence) + len(s) + 2 > chunk_chars:
                pieces.append(sentence.strip())
                sentence = ""
            sentence += s + ". "
        if sentence.strip():
            pieces.append(sentence.strip().removesuffix(". ."))
    out, cur = [], ""
    for piece in pieces:
        if cur and len(cur) + len(piece) + 2 > chunk_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{piece}" if cur else piece
    if cur:
        out.append(cur)
    return out


def doc_tasks(doc_dir: str | Path, per_source: int, chunk_chars: int) -> list[Task]:
    d = Path(doc_dir)
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix in (".txt", ".md")) if d.is_dir() else []
    if not files:
        raise UserError(f"--from-docs {d}: no .txt or .md files in it", param="from_docs")
    tasks: dict[str, Task] = {}  # a passage found twice is one task
    for f in files:
        for n, passage in enumerate(passages(f.read_text(encoding="utf-8", errors="replace"), chunk_chars)):
            for j in range(per_source):
                t = Task(f"d-{_digest(passage)}-{j}", passage, f"{f.relative_to(d)}#{n}")
                tasks.setdefault(t.key, t)
    return list(tasks.values())


# --- resume ------------------------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[dict]:
    """The complete JSON lines of an append-only file; a last line a kill cut short is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    out = []
    for i, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                raise UserError(f"{path}:{i} is not JSON; it is not a file `cairn synth` wrote (or was edited)",
                                param="out") from None
    return out


def progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress")


def logits_dir(out: Path) -> Path:
    return out.with_name(out.name + ".logits")


# --- the run -----------------------------------------------------------------------------------------------------


class Synthesizer:
    """One `cairn synth` run over an LLM (local or pool) writing to `out`."""

    def __init__(self, llm, cfg: SynthConfig, out: str | Path, teacher: str):
        """`llm`: the teacher, or a list of copies of it (replicas on pool devices): each task runs all its
        requests on the copy with the fewest tasks in flight when it starts."""
        import threading

        self.llms = list(llm) if isinstance(llm, (list, tuple)) else [llm]
        self.llm, self.cfg, self.out, self.teacher = self.llms[0], cfg, Path(out), teacher
        self._load = [0] * len(self.llms)
        self._load_lock = threading.Lock()
        self.progress = progress_path(self.out)
        self.stats = SynthStats()
        self.index = DedupIndex(ngram=cfg.near_dup_ngram)
        self.done: set[str] = set()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for rec in _read_lines(self.out):
            self.done.add(rec["id"])
            self.index.add(rec["meta"]["question"] if cfg.mode == "docs" else rec["messages"][-2]["content"],
                           rec["id"])
            self.stats.kept += 1
        for line in _read_lines(self.progress):
            self.done.add(line["id"])
            if line["status"] != "kept":
                self.stats.dropped[line["status"]] += 1

    # requests

    def _params(self, task: Task, stage: str, max_tokens: int) -> SamplingParams:
        seed = zlib.crc32(f"{self.cfg.seed}:{task.key}:{stage}".encode())
        return SamplingParams(max_tokens=max_tokens, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                              seed=seed)

    def _magpie_prefix(self) -> list[int]:
        tok = self.llm.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": _SENTINEL}], add_generation_prompt=False)
        if _SENTINEL not in text:
            raise UserError("the teacher's chat template drops the user's message; self-instruct needs a template "
                            "that shows it", param="mode")
        return tok.encode(text[: text.index(_SENTINEL)])

    def _instruction_prompt(self, task: Task) -> list[int]:
        if self.cfg.mode == "self-instruct":
            return self._magpie_prefix()
        text = (TOPIC_PROMPT.format(topic=task.source) if self.cfg.mode == "seeds"
                else DOC_QUESTION_PROMPT.format(passage=task.source))
        return self.llm.render_chat([{"role": "user", "content": text}])

    def _user_message(self, task: Task, instruction: str) -> str:
        return (DOC_ANSWER_PROMPT.format(passage=task.source, question=instruction) if self.cfg.mode == "docs"
                else instruction)

    def _ask(self, llm, prompt: list[int], params: SamplingParams, used: list[int]):
        done = llm.submit(prompt, params).result()
        used.append(len(done.token_ids))
        return done

    def _task(self, t: Task) -> dict:
        """One task on the least busy copy of the teacher."""
        with self._load_lock:
            i = min(range(len(self.llms)), key=self._load.__getitem__)
            self._load[i] += 1
        try:
            return self._run_task(self.llms[i], t)
        finally:
            with self._load_lock:
                self._load[i] -= 1

    def _run_task(self, llm, t: Task) -> dict:
        """One task from instruction to rated answer (on a worker thread: the engine batches the requests of
        every task in flight). Returns what happened: status None means a candidate for keeping."""
        c, used = self.cfg, []
        out: dict = {"instruction": t.instruction, "status": None, "tokens": used}
        if t.instruction is None:
            params = self._params(t, "instruction", c.instruction_tokens)
            o = self._ask(llm, self._instruction_prompt(t), params, used)
            text = clean_instruction(o.text)
            # a reply cut at the token limit still gives a question when one was extracted whole
            out["instruction"] = text if o.finish_reason != "length" or text.endswith("?") else ""
        if (why := instruction_problem(out["instruction"], c.min_chars, c.max_chars)) is not None:
            return {**out, "status": why}
        user = self._user_message(t, out["instruction"])
        system = [{"role": "system", "content": c.system}] if c.system else []
        o = self._ask(llm, self.llm.render_chat(system + [{"role": "user", "content": user}]),
                      self._params(t, "answer", c.max_tokens), used)
        if (why := answer_problem(o.text, o.finish_reason, c.min_chars, c.max_chars)) is not None:
            return {**out, "status": why}
        out["messages"] = [{"role": "user", "content": user}, {"role": "assistant", "content": o.text.strip()}]
        if c.judge_min is not None:
            from cairn.eval.judge import rate

            out["judge"] = rate(llm, [(user, o.text.strip())])[0]
            if out["judge"] is None or out["judge"] < c.judge_min:
                return {**out, "status": "judged below threshold"}
        return out

    # committing finished tasks

    def commit(self, tasks: list[Task], results: list[dict]) -> None:
        """Finished tasks, in task order: a duplicate of a kept instruction is dropped here, after the work, so
        which one is kept does not depend on which finished first; then the records and progress are written."""
        records, progress = [], []
        for t, r in zip(tasks, results):
            self.stats.generated_tokens += sum(r["tokens"])
            if r["status"] is None and (dup := self.index.add(r["instruction"], t.key)) is not None:
                r["status"] = f"{dup[0]} duplicate instruction"
            if r["status"] is None:
                meta = {"teacher": self.teacher, "mode": self.cfg.mode, "sampling": self.cfg.sampling(),
                        "seed": self.cfg.seed, "source": t.origin}
                if self.cfg.mode == "docs":
                    meta["question"] = r["instruction"]
                if "judge" in r:
                    meta["judge"] = r["judge"]
                records.append({"id": t.key, "messages": r["messages"], "meta": meta})
                r["status"] = "kept"
            progress.append({"id": t.key, "status": r["status"], "instruction": r["instruction"]})
        self._write(records, progress)

    def _write(self, records: list[dict], progress: list[dict]) -> None:
        """Teacher logits first (a shard is renamed into place whole), then the records, then the progress lines:
        a kill between them leaves tasks that the next run redoes, never a record without its logits."""
        if self.cfg.save_logits and records:
            from cairn.train.data import render_masked
            from cairn.train.distill import SparseTeacher
            from cairn.train.teacher_cache import write_shard

            entries = {}
            for r in records:
                ids = render_masked(self.llm.tokenizer, r["messages"]).ids
                top_ids, top_lp = self.llm.prompt_top(ids, self.cfg.save_logits)
                entries[r["id"]] = (ids, SparseTeacher(top_ids, top_lp))
            write_shard(logits_dir(self.out), entries, self.teacher)
        for path, lines in ((self.out, records), (self.progress, progress)):
            if not lines:
                continue
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
                f.flush()
                os.fsync(f.fileno())
        for p in progress:
            self.done.add(p["id"])
            if p["status"] == "kept":
                self.stats.kept += 1
            else:
                self.stats.dropped[p["status"]] += 1

    def run(self, tasks: Iterable[Task], on_batch: Callable[[int], None] | None = None) -> SynthStats:
        """Every task not finished before, `batch` of them in flight at any time (a new one starts as soon as one
        finishes, so the engine stays full); finished tasks are committed in task order, `commit_every` at a time."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        commit_every = min(self.cfg.batch, 16)
        it, order, results, running = iter(tasks), [], {}, {}
        exhausted, committed, seen = False, 0, set()
        with ThreadPoolExecutor(max_workers=self.cfg.batch, thread_name_prefix="synth") as pool:
            while True:
                while not exhausted and len(running) < self.cfg.batch:
                    t = next(it, None)
                    if t is None:
                        exhausted = True
                    elif t.key in self.done or t.key in seen:
                        self.stats.skipped += 1
                    else:
                        seen.add(t.key)
                        order.append(t)
                        running[pool.submit(self._task, t)] = t
                if running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for f in finished:
                        results[running.pop(f).key] = f.result()
                ready = committed
                while ready < len(order) and order[ready].key in results:
                    ready += 1
                last = exhausted and not running
                if ready - committed >= commit_every or (last and ready > committed):
                    batch = order[committed:ready]
                    self.commit(batch, [results.pop(t.key) for t in batch])
                    committed = ready
                    if on_batch:
                        on_batch(len(batch))
                if last:
                    return self.stats

    def self_instruct_tasks(self) -> Iterator[Task]:
        """Tasks m-0, m-1, ... while fewer than `count` examples are kept (and at most 4 x count asked); the tasks
        in flight when the count is reached finish and are kept too."""
        j = 0
        while self.stats.kept < self.cfg.count and j < 4 * self.cfg.count:
            yield Task(f"m-{j}")
            j += 1

    def run_self_instruct(self, on_batch: Callable[[int], None] | None = None) -> SynthStats:
        return self.run(self.self_instruct_tasks(), on_batch)
