"""Caption metrics through pycocoevalcap (the COCO caption reference code): BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D.

Text goes through pycocoevalcap's PTB tokenizer (Stanford CoreNLP jar, Java) first, as in the COCO evaluation.
pycocoevalcap's ``Cider`` is CIDEr-D (Gaussian length penalty, clipped n-gram counts, sigma 6, x10), with document
frequencies from the references being scored.

Speed (scoring is in every validation round): the METEOR 1.5 jar processes are started once per scorer and kept
alive; each scores its share of the pairs with pycocoevalcap's own ``SCORE`` protocol, written in one go instead of
one round trip per pair, while Python computes BLEU, ROUGE-L and CIDEr-D. ROUGE-L's longest common subsequence
runs in rapidfuzz (C++) instead of pycocoevalcap's pure-Python ``my_lcs``; the formula around it stays
pycocoevalcap's. Every score equals pycocoevalcap's scorers called directly (tested).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from unittest import mock

from pipeline.errors import PipelineError

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
FAMILIES = ("BLEU", "METEOR", "ROUGE-L", "CIDEr-D")


class CaptionScorer:
    """Score hypotheses against references. ``meteor=False`` skips METEOR (and its Java start-up, ~10 s);
    ``meteor_processes`` METEOR jars share the pairs of each call (default: 1 below 4 CPUs, where a second jar
    only competes with Python's BLEU/CIDEr-D for the cores, else 2)."""

    def __init__(self, meteor: bool = True, meteor_processes: int | None = None):
        if shutil.which("java") is None:
            raise PipelineError("java not found: pycocoevalcap's PTB tokenizer and METEOR need a Java runtime "
                                "(Debian/Ubuntu: apt-get install default-jre-headless)")
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        self._tokenizer = PTBTokenizer()
        self._bleu, self._rouge, self._cider = Bleu(4), Rouge(), Cider()
        self._meteors: list = []
        if meteor:
            from pycocoevalcap.meteor.meteor import Meteor

            if meteor_processes is None:
                meteor_processes = 1 if _usable_cpus() < 4 else 2
            # each Meteor() starts its jar now; it loads its paraphrase tables while the caller goes on
            self._meteors = [Meteor() for _ in range(max(1, meteor_processes))]

    def tokenize(self, captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        return self._tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})

    def score(self, references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str],
              only: Sequence[str] | None = None) -> dict[str, float]:
        """Corpus-level scores; ``references`` and ``hypotheses`` must cover the same ids. ``only`` picks metric
        families ("BLEU", "METEOR", "ROUGE-L", "CIDEr-D"); default all (METEOR when the scorer has it)."""
        if set(references) != set(hypotheses):
            missing = sorted(set(references) ^ set(hypotheses))[:5]
            raise ValueError(f"references and hypotheses differ in ids, e.g. {missing}")
        if not references:
            raise ValueError("nothing to score")
        wanted = set(only or FAMILIES)
        unknown = wanted - set(FAMILIES) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {FAMILIES}")
        gts, res = self._tokenize_pairs(references, hypotheses)
        out: dict[str, float] = {}
        meteor = None
        if "METEOR" in wanted and self._meteors:
            meteor = _MeteorRun(self._meteors, gts, res)
        if "BLEU" in wanted or any(w.startswith("BLEU-") for w in wanted):
            bleu, _ = self._bleu.compute_score(gts, res, verbose=0)
            out.update({f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)})
        if "ROUGE-L" in wanted:
            out["ROUGE-L"] = self._rouge_l(gts, res)
        if "CIDEr-D" in wanted:
            out["CIDEr-D"] = float(self._cider.compute_score(gts, res)[0])
        if meteor is not None:
            out["METEOR"] = meteor.result()
        return {name: out[name] for name in METRICS if name in out}

    def _tokenize_pairs(self, references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str]
                        ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """PTB-tokenize references and hypotheses in one Java call."""
        both = self.tokenize({**{f"r{k}": list(v) for k, v in references.items()},
                              **{f"h{k}": [v] for k, v in hypotheses.items()}})
        gts = {k: both[f"r{k}"] for k in references}
        # an empty hypothesis breaks METEOR's protocol and BLEU's counts; score it as a lone unknown word
        res = {k: [both[f"h{k}"][0] if both[f"h{k}"][0].strip() else "<empty>"] for k in references}
        return gts, res

    def _rouge_l(self, gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
        """pycocoevalcap's ROUGE-L with rapidfuzz's C++ LCS length in place of its pure-Python ``my_lcs``
        (same value, ~30x faster on 50-word captions)."""
        import pycocoevalcap.rouge.rouge as rouge_module
        from rapidfuzz.distance import LCSseq

        with mock.patch.object(rouge_module, "my_lcs", LCSseq.similarity):
            return float(self._rouge.compute_score(gts, res)[0])

    def close(self) -> None:
        """Stop the METEOR Java processes (pycocoevalcap stops each when its scorer object is collected)."""
        self._meteors = []

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _usable_cpus() -> int:
    """CPUs this process may run on (a Slurm/cgroup allotment on Linux; every CPU where that is unknown, e.g. macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class _MeteorRun:
    """METEOR over pycocoevalcap's jar processes, in background threads.

    pycocoevalcap's ``Meteor.compute_score`` sends one ``SCORE ||| refs ||| hyp`` line per pair and waits for its
    statistics line before the next, then one ``EVAL ||| stats ||| ...`` line for the corpus score. Here every
    process gets its share of the SCORE lines written at once (a writer thread keeps the pipe full while the
    statistics are read back), then the statistics, added up, go to the first process in one EVAL line: the same
    score, without a round trip per pair.
    """

    def __init__(self, meteors: list, gts: dict[str, list[str]], res: dict[str, list[str]]):
        keys = list(gts)
        self._meteors = meteors
        self._lines = [_score_line(gts[k], res[k][0]) for k in keys]
        shares = [range(i, len(keys), len(meteors)) for i in range(len(meteors))]
        self._stats: list[str | None] = [None] * len(keys)
        self._errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run, args=(m, share), daemon=True)
                         for m, share in zip(meteors, shares) if len(share)]
        for t in self._threads:
            t.start()

    def _run(self, meteor, share: range) -> None:
        try:
            with meteor.lock:
                proc = meteor.meteor_p
                writer = threading.Thread(target=_write_lines, args=(proc.stdin, [self._lines[i] for i in share]),
                                          daemon=True)
                writer.start()
                for i in share:
                    self._stats[i] = proc.stdout.readline().decode().strip()
                writer.join()
        except BaseException as exc:  # re-raised in result()
            self._errors.append(exc)

    def result(self) -> float:
        for t in self._threads:
            t.join()
        if self._errors:
            raise PipelineError(f"METEOR failed: {self._errors[0]}") from self._errors[0]
        if any(not s for s in self._stats):
            raise PipelineError("METEOR jar stopped answering (out of memory? see `java -Xmx2G`)")
        # METEOR's 23 statistics are aggregable: EVAL adds every pair's up before it scores the corpus. Adding
        # them here (in the same order) sends one statistics line instead of one per pair; the score is the same.
        totals = [sum(column) for column in zip(*([float(x) for x in s.split()] for s in self._stats))]
        meteor = self._meteors[0]
        with meteor.lock:
            proc = meteor.meteor_p
            proc.stdin.write(("EVAL ||| " + " ".join(repr(x) for x in totals) + "\n").encode())
            proc.stdin.flush()
            proc.stdout.readline()  # the one "pair"'s score, then the aggregate: equal here
            return float(proc.stdout.readline().strip())


def _score_line(references: list[str], hypothesis: str) -> bytes:
    """pycocoevalcap's ``Meteor._stat`` request line."""
    hypothesis = hypothesis.replace("|||", "").replace("  ", " ")
    return ("SCORE ||| " + " ||| ".join(references) + " ||| " + hypothesis + "\n").encode()


def _write_lines(stream, lines: list[bytes]) -> None:
    stream.write(b"".join(lines))
    stream.flush()
