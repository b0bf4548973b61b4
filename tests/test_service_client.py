"""The service client's own checks, without servers: what it makes of answers that cannot be right."""
from __future__ import annotations

import json

import numpy as np
import pytest

from orchestration.client.jobs import UNKNOWN
from orchestration.mpspdz.hosts import write_hosts
from orchestration.shared.model import ModelError
from orchestration.client.service import ServiceClient

GOOD = (np.array([1, 0]), np.array([1.25, 1.0]), "g1")
# a local truncation that wrapped: the denominator's share is off by 2^(64-16), 2^32 once decoded
WRAPPED = (np.array([1, 0]), np.array([1.25, 1.0 + 2.0 ** 32]), "g1")


class Scripted(ServiceClient):
    """Answers from a script instead of two servers."""

    def __init__(self, tmp_path, answers):
        (tmp_path / "model.json").write_text(json.dumps({"d": 2, "classes": ["ann", "bob"], "run_id": "r1",
                                                         "gen": "g1"}))
        super().__init__(tmp_path, write_hosts(tmp_path / "hosts", [("127.0.0.1", 9), ("127.0.0.1", 10)]))
        self.answers = list(answers)
        self.asked = 0

    def recognise_shares(self, padded, gen):
        assert padded.shape == (2, 3) and gen == "g1"
        self.asked += 1
        return self.answers.pop(0)


def test_an_answer_out_of_range_is_asked_again_once_and_then_an_error(tmp_path):
    x = np.array([[0.6, 0.8], [1.0, 0.0]])
    cl = Scripted(tmp_path, [WRAPPED, GOOD])
    preds = cl.recognise(x, threshold=0.9).predictions
    assert cl.asked == 2
    assert [(p.label, p.best) for p in preds] == [(UNKNOWN, 1), (0, 0)]  # 1/1.25 = 0.8 < 0.9: unknown
    with pytest.raises(ModelError, match="out of range twice"):
        Scripted(tmp_path, [WRAPPED, WRAPPED]).recognise(x, threshold=0.9)
    with pytest.raises(ModelError, match="out of range twice"):
        Scripted(tmp_path, [(np.array([2, 0]), GOOD[1], "g1")] * 2).recognise(x, threshold=0.9)  # no class 2
