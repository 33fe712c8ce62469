"""Caption metrics through pycocoevalcap (the COCO caption reference code): BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D.

Text goes through pycocoevalcap's PTB tokenizer (Stanford CoreNLP jar, Java) first, as in the COCO evaluation.
pycocoevalcap's ``Cider`` is CIDEr-D (Gaussian length penalty, clipped n-gram counts, sigma 6, x10), with document
frequencies from the references being scored.

Speed (scoring is in every validation round): the METEOR 1.5 jar that ships with pycocoevalcap is started once per
scorer and kept alive (``MeteorProcess``); each process scores its share of the pairs with the jar's own ``SCORE``
protocol, written in one go instead of one round trip per pair, while Python computes BLEU, ROUGE-L and CIDEr-D.
ROUGE-L is pycocoevalcap's formula with the longest common subsequence from rapidfuzz (C++) instead of its
pure-Python ``my_lcs``. Every score equals pycocoevalcap's scorers called directly (tested).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from importlib.resources import files

import numpy as np

from pipeline.core.cpus import usable_cpus
from pipeline.core.errors import PipelineError
from pipeline.data.text import MAX_CAPTION_WORDS

METEOR_SERVICE_ENV = "FASHION_DISTILL_METEOR"  # where a MeteorService listens: scorers use it instead of a jar
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
FAMILIES = ("BLEU", "METEOR", "ROUGE-L", "CIDEr-D")
ROUGE_BETA = 1.2  # pycocoevalcap's Rouge.beta
METEOR_MAX_TOKENS = 2 * MAX_CAPTION_WORDS  # PTB tokens (punctuation split off) of a caption METEOR is given


class CaptionScorer:
    """Score hypotheses against references. ``meteor=False`` skips METEOR (and its Java start-up, ~10 s);
    ``meteor_processes`` METEOR jars share the pairs of each call (default: 1 below 4 CPUs, where a second jar
    only competes with Python's BLEU/CIDEr-D for the cores, else 2), or, where ``METEOR_SERVICE_ENV`` names a
    :class:`MeteorService`, that service's one jar (``meteor_processes`` is then ignored). ``close()`` (or leaving a
    ``with`` block) stops the jars."""

    def __init__(self, meteor: bool = True, meteor_processes: int | None = None):
        if shutil.which("java") is None:
            raise PipelineError("java not found: pycocoevalcap's PTB tokenizer and METEOR need a Java runtime "
                                "(Debian/Ubuntu: apt-get install default-jre-headless)")
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        self._tokenizer = PTBTokenizer()
        self._bleu, self._cider = Bleu(4), Cider()
        self._meteors: list[MeteorProcess | MeteorClient] = []
        if meteor and os.environ.get(METEOR_SERVICE_ENV):
            self._meteors = [MeteorClient(os.environ[METEOR_SERVICE_ENV])]
        elif meteor:
            if meteor_processes is None:
                meteor_processes = 1 if usable_cpus() < 4 else 2
            # each jar starts now and loads its paraphrase tables while the caller goes on
            self._meteors = [MeteorProcess() for _ in range(max(1, meteor_processes))]

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
            for key in gts:  # the jar dies on a caption of ~24k words
                if (n := max(len(c.split()) for c in (*gts[key], *res[key]))) > METEOR_MAX_TOKENS:
                    raise PipelineError(f"METEOR: image {key!r} has a caption of {n} tokens (at most "
                                        f"{METEOR_MAX_TOKENS})")
            meteor = _MeteorRun(self._meteors, gts, res)
        if "BLEU" in wanted or any(w.startswith("BLEU-") for w in wanted):
            bleu, _ = self._bleu.compute_score(gts, res, verbose=0)
            out.update({f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)})
        if "ROUGE-L" in wanted:
            out["ROUGE-L"] = rouge_l(gts, res)
        if "CIDEr-D" in wanted:
            out["CIDEr-D"] = float(self._cider.compute_score(gts, res)[0])
        if meteor is not None:
            out["METEOR"] = meteor.result()
        return {name: out[name] for name in METRICS if name in out}

    def per_image_cider(self, references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str]
                        ) -> dict[str, float]:
        """Each image's CIDEr-D (pycocoevalcap's per-image scores, document frequencies from all of ``references``):
        their mean is :meth:`score`'s corpus CIDEr-D."""
        if set(references) != set(hypotheses):
            missing = sorted(set(references) ^ set(hypotheses))[:5]
            raise ValueError(f"references and hypotheses differ in ids, e.g. {missing}")
        if not references:
            raise ValueError("nothing to score")
        gts, res = self._tokenize_pairs(references, hypotheses)
        _, scores = self._cider.compute_score(gts, res)
        return {k: float(v) for k, v in zip(gts, scores)}

    def _tokenize_pairs(self, references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str]
                        ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """PTB-tokenize references and hypotheses in one Java call."""
        both = self.tokenize({**{f"r{k}": list(v) for k, v in references.items()},
                              **{f"h{k}": [v] for k, v in hypotheses.items()}})
        gts = {k: both[f"r{k}"] for k in references}
        # an empty hypothesis breaks METEOR's protocol and BLEU's counts; score it as a lone unknown word
        res = {k: [both[f"h{k}"][0] if both[f"h{k}"][0].strip() else "<empty>"] for k in references}
        return gts, res

    def close(self) -> None:
        """Stop the METEOR Java processes and wait for them to end."""
        for meteor in self._meteors:
            meteor.close()
        self._meteors = []

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rouge_l(gts: Mapping[str, Sequence[str]], res: Mapping[str, Sequence[str]]) -> float:
    """pycocoevalcap's ROUGE-L (``Rouge.compute_score``): per image the F-measure (beta 1.2) of the best precision
    and best recall over its references, averaged over images. The LCS length comes from rapidfuzz (C++), ~30x
    faster than pycocoevalcap's pure-Python ``my_lcs`` on 50-word captions; the value is the same."""
    from rapidfuzz.distance import LCSseq

    scores = []
    for key, refs in gts.items():
        candidate, tokens = res[key][0].split(" "), [ref.split(" ") for ref in refs]
        lcs = [LCSseq.similarity(ref, candidate) for ref in tokens]
        prec = max(n / float(len(candidate)) for n in lcs)
        rec = max(n / float(len(ref)) for n, ref in zip(lcs, tokens))
        if prec != 0 and rec != 0:
            scores.append(((1 + ROUGE_BETA**2) * prec * rec) / float(rec + ROUGE_BETA**2 * prec))
        else:
            scores.append(0.0)
    return float(np.mean(np.array(scores)))


class MeteorProcess:
    """One METEOR 1.5 jar (the copy inside the pycocoevalcap package), driven over its ``-stdio`` protocol.

    Why ours: pycocoevalcap's ``Meteor`` makes one stdin/stdout round trip per pair and offers its process only
    as internal attributes, so batching meant reaching into them, and dropping it did not reliably stop the jar.
    This class owns its process: ``statistics`` writes all ``SCORE`` lines at once, ``evaluate`` sends one
    ``EVAL`` line, and ``close`` (also on garbage collection and at interpreter exit) terminates it and waits.
    """

    def __init__(self):
        folder = files("pycocoevalcap").joinpath("meteor")
        if not folder.joinpath("meteor-1.5.jar").is_file():
            raise PipelineError(f"METEOR jar not found: {folder}/meteor-1.5.jar; reinstall pycocoevalcap")
        # pycocoevalcap's command line and working folder (the jar finds data/paraphrase-en.gz there)
        self._proc = subprocess.Popen(["java", "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en",
                                       "-norm"], cwd=str(folder), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL)
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop, self._proc)

    def statistics(self, lines: list[bytes]) -> list[str]:
        """The statistics line of each ``SCORE`` request; a writer thread keeps the pipe full while they are read
        ("" where the jar stopped answering)."""
        with self._lock:
            writer = threading.Thread(target=_write_quietly, args=(self._proc.stdin, lines), daemon=True)
            writer.start()
            stats = [self._proc.stdout.readline().decode().strip() for _ in lines]
            writer.join()
        return stats

    def evaluate(self, stats: Sequence[float]) -> float:
        """The METEOR score of one ``EVAL`` line carrying (summed) statistics."""
        with self._lock:
            _write_lines(self._proc.stdin, [("EVAL ||| " + " ".join(repr(x) for x in stats) + "\n").encode()])
            self._proc.stdout.readline()  # the one "pair"'s score, then the aggregate: equal here
            return float(self._proc.stdout.readline().strip())

    def close(self) -> None:
        """Terminate the jar and wait for it to end (again: nothing)."""
        self._finalizer()

    def __enter__(self) -> MeteorProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MeteorService:
    """One METEOR jar for the scorers of several processes (the demo's student steps, each of which would start its
    own: ~8 CPU-s of Java loading paraphrase tables). It answers ``statistics`` and ``evaluate`` requests on a Unix
    socket (``multiprocessing.connection``, with a random key), one thread per connected scorer; both requests are
    stateless, so scorers may interleave. Inside ``with``, ``METEOR_SERVICE_ENV`` names it to this process and the
    processes it starts."""

    def __init__(self):
        from multiprocessing.connection import Listener

        # a short folder: a Unix socket's path is limited to ~107 bytes, which a long TMPDIR can exceed
        self._folder = tempfile.mkdtemp(prefix="meteor-", dir="/tmp" if os.path.isdir("/tmp") else None)
        self._key = os.urandom(16)
        try:
            self._listener = Listener(os.path.join(self._folder, "socket"), family="AF_UNIX", authkey=self._key)
        except OSError:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise
        self.address = f"{self._listener.address}#{self._key.hex()}"
        self._meteor = MeteorProcess()
        self._closed = False
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                connection = self._listener.accept()
            except Exception:  # a client gone or with a wrong key during the handshake: serve the next one
                continue
            if self._closed:
                connection.close()
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection) -> None:
        with connection:
            while True:
                try:
                    request, payload = connection.recv()
                except (EOFError, OSError):
                    return
                try:
                    answer = (self._meteor.statistics(payload) if request == "statistics"
                              else self._meteor.evaluate(payload))
                except Exception as exc:  # the client raises it
                    answer = PipelineError(f"METEOR service: {exc}")
                try:
                    connection.send(answer)
                except OSError:  # the client's process ended
                    return

    def close(self) -> None:
        """Stop accepting (a last connection of our own wakes the waiting ``accept``), stop the jar."""
        from multiprocessing.connection import Client

        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, EOFError), Client(self._listener.address, family="AF_UNIX",
                                                            authkey=self._key):
            pass
        self._accepting.join(timeout=10)
        self._listener.close()
        self._meteor.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> MeteorService:
        self._previous = os.environ.get(METEOR_SERVICE_ENV)
        os.environ[METEOR_SERVICE_ENV] = self.address
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is None:
            os.environ.pop(METEOR_SERVICE_ENV, None)
        else:
            os.environ[METEOR_SERVICE_ENV] = self._previous
        self.close()


class MeteorClient:
    """A :class:`MeteorService`'s jar, with :class:`MeteorProcess`'s ``statistics`` / ``evaluate``."""

    def __init__(self, address: str):
        from multiprocessing.connection import Client

        path, _, key = address.rpartition("#")
        try:
            self._connection = Client(path, family="AF_UNIX", authkey=bytes.fromhex(key))
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{METEOR_SERVICE_ENV}={address}: no METEOR service there ({exc}); unset it to "
                                "start a METEOR jar in this process") from None
        self._lock = threading.Lock()

    def _ask(self, request: str, payload):
        with self._lock:
            self._connection.send((request, payload))
            answer = self._connection.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def statistics(self, lines: list[bytes]) -> list[str]:
        return self._ask("statistics", lines)

    def evaluate(self, stats: Sequence[float]) -> float:
        return self._ask("evaluate", list(stats))

    def close(self) -> None:
        self._connection.close()


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a jar and reap it (killed if it has not ended within 10 s)."""
    proc.terminate()
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


class _MeteorRun:
    """METEOR over the scorer's jar processes, in background threads.

    pycocoevalcap's ``Meteor.compute_score`` sends one ``SCORE ||| refs ||| hyp`` line per pair and waits for its
    statistics line before the next, then one ``EVAL ||| stats ||| ...`` line for the corpus score. Here every
    process gets its share of the SCORE lines written at once, then the statistics, added up, go to the first
    process in one EVAL line: the same score, without a round trip per pair.
    """

    def __init__(self, meteors: list[MeteorProcess], gts: dict[str, list[str]], res: dict[str, list[str]]):
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

    def _run(self, meteor: MeteorProcess, share: range) -> None:
        try:
            for i, stats in zip(share, meteor.statistics([self._lines[i] for i in share])):
                self._stats[i] = stats
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
        return self._meteors[0].evaluate(totals)


def _score_line(references: list[str], hypothesis: str) -> bytes:
    """pycocoevalcap's ``Meteor._stat`` request line."""
    hypothesis = hypothesis.replace("|||", "").replace("  ", " ")
    return ("SCORE ||| " + " ||| ".join(references) + " ||| " + hypothesis + "\n").encode()


def _write_lines(stream, lines: list[bytes]) -> None:
    stream.write(b"".join(lines))
    stream.flush()


def _write_quietly(stream, lines: list[bytes]) -> None:
    """``_write_lines`` in a writer thread: a jar that died is reported by its reader, not a thread's traceback."""
    with contextlib.suppress(BrokenPipeError):
        _write_lines(stream, lines)
