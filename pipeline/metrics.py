"""Caption metrics through pycocoevalcap (the COCO caption reference code): BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D.

Text goes through pycocoevalcap's PTB tokenizer (Stanford CoreNLP jar, Java) first, as in the COCO evaluation.
pycocoevalcap's ``Cider`` is CIDEr-D (Gaussian length penalty, clipped n-gram counts, sigma 6, x10), with document
frequencies from the references being scored. One METEOR Java process is kept alive per scorer, so repeated
validation rounds do not pay its start-up.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence

from pipeline.errors import PipelineError

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


class CaptionScorer:
    """Score hypotheses against references; ``meteor=False`` skips the (slowest) METEOR scorer."""

    def __init__(self, meteor: bool = True):
        if shutil.which("java") is None:
            raise PipelineError("java not found: pycocoevalcap's PTB tokenizer and METEOR need a Java runtime "
                                "(Debian/Ubuntu: apt-get install default-jre-headless)")
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        self._tokenizer = PTBTokenizer()
        self._bleu, self._rouge, self._cider = Bleu(4), Rouge(), Cider()
        self._meteor = None
        if meteor:
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = Meteor()

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
        gts = self.tokenize(references)
        res = self.tokenize({k: [v] for k, v in hypotheses.items()})
        # an empty hypothesis breaks METEOR's protocol and BLEU's counts; score it as a lone unknown word
        res = {k: [v[0] if v[0].strip() else "<empty>"] for k, v in res.items()}
        wanted = set(only or ("BLEU", "METEOR", "ROUGE-L", "CIDEr-D"))
        out: dict[str, float] = {}
        if "BLEU" in wanted or any(w.startswith("BLEU-") for w in wanted):
            bleu, _ = self._bleu.compute_score(gts, res, verbose=0)
            out.update({f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)})
        if "METEOR" in wanted and self._meteor is not None:
            out["METEOR"] = float(self._meteor.compute_score(gts, res)[0])
        if "ROUGE-L" in wanted:
            out["ROUGE-L"] = float(self._rouge.compute_score(gts, res)[0])
        if "CIDEr-D" in wanted:
            out["CIDEr-D"] = float(self._cider.compute_score(gts, res)[0])
        return out

    def close(self) -> None:
        """Stop the METEOR Java process (pycocoevalcap stops it when its scorer object is collected)."""
        self._meteor = None

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
