import gc
import json

import psutil  # installed with accelerate
import pytest

from pipeline.core.errors import PipelineError
from pipeline.evaluation.metrics import CaptionScorer, MeteorProcess


def test_metrics_match_pycocoevalcap_scorers_called_directly():
    """Our batched METEOR, rapidfuzz LCS for ROUGE-L and joint tokenisation give pycocoevalcap's exact scores."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from pipeline.demo.synthetic import load_caption_pool

    pool = load_caption_pool()
    test, train = list(pool["test"].values()), list(pool["train"].values())
    # 1 to 3 references per image, real DeepFashion captions as hypotheses (one short, one with METEOR's separator)
    refs = {f"img{i}": test[3 * i: 3 * i + 1 + i % 3] for i in range(150)}
    hyps = {k: train[i] for i, k in enumerate(refs)}
    hyps["img0"], hyps["img1"] = "a shirt", "The lady ||| wears a shirt."
    with CaptionScorer(meteor_processes=2) as scorer:
        ours = scorer.score(refs, hyps)
        assert scorer.score(refs, hyps, only=["CIDEr-D"]) == {"CIDEr-D": ours["CIDEr-D"]}
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in hyps.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    direct = {**{f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}, "METEOR": Meteor().compute_score(gts, res)[0],
              "ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr-D": Cider().compute_score(gts, res)[0]}
    assert list(ours) == list(direct)
    for name, value in direct.items():
        assert ours[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    assert 0 < ours["BLEU-4"] < 1 and 0 < ours["METEOR"] < 1 and ours["CIDEr-D"] > 0


def test_metrics_reject_mismatched_ids_and_unknown_metrics():
    with CaptionScorer(meteor=False) as scorer:
        with pytest.raises(ValueError, match="differ in ids"):
            scorer.score({"a": ["a red shirt"]}, {"b": "a red shirt"})
        with pytest.raises(ValueError, match="unknown metrics"):
            scorer.score({"a": ["a red shirt"]}, {"a": "a red shirt"}, only=["SPICE"])
        assert "METEOR" not in scorer.score({"a": ["a red shirt"]}, {"a": "a red shirt"})


def test_a_caption_meteor_cannot_take_is_refused_in_one_line():
    """The METEOR jar dies on a caption of ~24k words (its writer thread printed a traceback): refused first."""
    refs, hyps = {"a": ["a lady in a red dress ."], "b": ["a man ."]}, {"a": "word " * 24_000, "b": "a man ."}
    with CaptionScorer(meteor_processes=1) as scorer:
        with pytest.raises(PipelineError, match=r"^METEOR: image 'a' has a caption of 24000 tokens \(at most 2000\)$"):
            scorer.score(refs, hyps)
        assert scorer.score(refs, hyps, only=["BLEU"])["BLEU-1"] > 0  # nothing else refuses it


def _meteor_jars() -> set[int]:
    """Pids of the METEOR jars this test process has started and not yet reaped."""
    return {p.pid for p in psutil.Process().children() if "meteor-1.5.jar" in p.cmdline()}


def test_close_ends_the_meteor_processes():
    before = _meteor_jars()
    with CaptionScorer(meteor_processes=2) as scorer:
        jars = _meteor_jars() - before
        assert len(jars) == 2
        assert scorer.score({"a": ["a red shirt"]}, {"a": "a red shirt"}, only=["METEOR"])["METEOR"] > 0.9
    assert not any(psutil.pid_exists(pid) for pid in jars)
    scorer.close()  # again: nothing to do
    assert "METEOR" not in scorer.score({"a": ["a red shirt"]}, {"a": "a red shirt"})


def test_a_dropped_meteor_process_is_stopped():
    before = _meteor_jars()
    meteor = MeteorProcess()
    (pid,) = _meteor_jars() - before
    del meteor
    gc.collect()
    assert not psutil.pid_exists(pid)


def test_processes_share_one_meteor_service():
    """Scorers in child processes score METEOR with the service's jar, start none of their own, and get what a
    scorer with its own jar gets; without the service a bad address fails in one line naming it."""
    import os
    import subprocess
    import sys

    from pipeline.core.errors import PipelineError
    from pipeline.evaluation.metrics import METEOR_SERVICE_ENV, MeteorService

    refs = {"a": ["a red shirt with long sleeves", "a long-sleeve red shirt"], "b": ["blue denim shorts"]}
    hyps = {"a": "a red shirt with short sleeves", "b": "the shorts are blue"}
    with CaptionScorer(meteor_processes=1) as scorer:
        expected = scorer.score(refs, hyps, only=["METEOR"])["METEOR"]
    child = ("import json, psutil\nfrom pipeline.evaluation.metrics import CaptionScorer\n"
             f"with CaptionScorer() as s:\n    m = s.score({refs!r}, {hyps!r}, only=['METEOR'])['METEOR']\n"
             "    jars = [p for p in psutil.Process().children() if 'meteor-1.5.jar' in p.cmdline()]\n"
             "print(json.dumps([m, len(jars)]))")
    with MeteorService() as service:
        assert os.environ[METEOR_SERVICE_ENV] == service.address
        runs = [subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True) for _ in range(2)]
        results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in runs]
        with CaptionScorer() as scorer:  # in this process too
            assert scorer.score(refs, hyps, only=["METEOR"])["METEOR"] == expected
    assert METEOR_SERVICE_ENV not in os.environ
    assert results == [[expected, 0], [expected, 0]]
    os.environ[METEOR_SERVICE_ENV] = service.address  # closed: nobody listens
    try:
        with pytest.raises(PipelineError, match=f"{METEOR_SERVICE_ENV}=.*no METEOR service there"):
            CaptionScorer()
    finally:
        del os.environ[METEOR_SERVICE_ENV]


def test_meteor_service_survives_a_failed_handshake_and_closes():
    """A client with a wrong key (or gone mid-handshake) does not stop the service for the next scorer; closing it
    ends its accepting thread and removes its socket folder."""
    import os
    from multiprocessing.connection import AuthenticationError, Client

    from pipeline.evaluation.metrics import MeteorService

    with MeteorService() as service:
        path = service.address.rpartition("#")[0]
        with pytest.raises(AuthenticationError):
            Client(path, family="AF_UNIX", authkey=b"wrong key")
        with CaptionScorer() as scorer:
            assert scorer.score({"a": ["a red shirt"]}, {"a": "a red shirt"}, only=["METEOR"])["METEOR"] > 0.9
    assert not service._accepting.is_alive() and not os.path.exists(os.path.dirname(path))
