"""What the client and the servers agree on about a model and its jobs: the MPC programs' names (one per job
kind, as in mpc_programs/), the name of the client's confirmation ticket, and the error for a missing or
mismatched model. A client that only talks to remote servers needs these and no server code."""
from __future__ import annotations

from orchestration.mpspdz.toolchain import MPSPDZError

TRAIN_PROGRAM = "face_train"
PREDICT_PROGRAM = "face_predict"
REFRESH_PROGRAM = "face_refresh"
ENROL_PROGRAM = "gallery_enrol"  # one person's model column from shares of their photos
PROGRAMS = {"train": TRAIN_PROGRAM, "predict": PREDICT_PROGRAM, "refresh": REFRESH_PROGRAM}
CONFIRM_FILE = "confirm.json"  # the client's confirmation ticket (see orchestration.server.job.confirm)


class ModelError(MPSPDZError):
    """No model, or the server's model shares do not match what the client expects."""


__all__ = ["CONFIRM_FILE", "ENROL_PROGRAM", "PREDICT_PROGRAM", "PROGRAMS", "REFRESH_PROGRAM", "TRAIN_PROGRAM", "ModelError"]
