from tests.chsim.simproc import spawn, workdir

__all__ = ["spawn", "workdir"]
