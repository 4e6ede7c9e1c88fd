"""The one progress display (adapters/progress.py): tqdm on stderr, off without a terminal or with
CONCEPTGATE_PROGRESS=0, forced on with CONCEPTGATE_PROGRESS=1; log lines never tear a bar."""

import io
import sys

from conceptgate.adapters import progress as P


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _terminal(monkeypatch):
    """stderr a terminal, stdout a plain buffer (set inside the test: pytest's capture is installed later
    than fixtures run)."""
    err, out = _Tty(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.delenv(P.ENV, raising=False)
    return err, out


def test_on_a_terminal_the_bar_draws_on_stderr_with_an_eta(monkeypatch):
    err, out = _terminal(monkeypatch)
    b = P.bar(4, "work", unit="step", mininterval=0)
    for _ in range(2):
        b.update(1)
    b.close()
    text = err.getvalue()
    assert "work" in text and "4/4" not in text and "2/4" in text and "<" in text  # elapsed<remaining
    assert out.getvalue() == ""  # nothing on stdout


def test_off_without_a_terminal_and_with_the_variable(monkeypatch):
    _terminal(monkeypatch)
    monkeypatch.setenv(P.ENV, "0")
    assert not P.enabled() and P.bar(3).disable
    monkeypatch.delenv(P.ENV)
    assert P.enabled() and not P.enabled(False)      # --no-progress wins on a terminal too
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal (CI, a log file)
    assert not P.enabled() and not P.enabled(True)
    b = P.bar(3, "quiet")
    b.update(3)
    b.close()
    assert sys.stderr.getvalue() == ""
    monkeypatch.setenv(P.ENV, "1")                    # forced on: ASCII, redrawn every 30 s
    assert P.enabled() and not P.enabled(False)
    b = P.bar(3, "forced")
    b.update(3)
    b.close()
    assert "forced" in sys.stderr.getvalue() and "3/3" in sys.stderr.getvalue()


def test_iterate_and_write(monkeypatch):
    err, out = _terminal(monkeypatch)
    seen = []
    for x in P.iterate(["a", "b", "c"], "items", mininterval=0):
        P.write(f"got {x}")
        seen.append(x)
    assert seen == ["a", "b", "c"]
    assert out.getvalue().splitlines() == ["got a", "got b", "got c"]
    assert "items" in err.getvalue() and "3/3" in err.getvalue()


def test_trainer_loop_uses_the_common_bar(monkeypatch, tmp_path):
    """CheckpointedTrainer draws its bar through adapters.progress (stderr, off with the variable)."""
    import conceptgate.adapters.training as T

    made = []
    real = P.bar

    def spy(*a, **kw):
        made.append((a, kw))
        return real(*a, **kw)

    monkeypatch.setattr(P, "bar", spy)

    class Cfg:
        iterations, save_every, seed = 3, 0, 0

        def trajectory_key(self):
            return {"iterations": 3}

    class Tiny(T.CheckpointedTrainer):
        progress_desc = "tiny"

        def __init__(self):
            import torch

            self.config, self.iteration, self.losses = Cfg(), 0, []
            self.w = torch.nn.Linear(1, 1)
            self.optimizer = torch.optim.SGD(self.w.parameters(), lr=0.1)
            self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: 1.0)
            self.generator = torch.Generator().manual_seed(0)

        def step(self):
            self.iteration += 1
            self.losses.append((self.iteration, 1.0, 0.0, 0.0))
            return {"loss": 1.0}

        def trained_module(self):
            return self.w

        def save(self, path, name=None):
            open(path, "w").close()

        def eraser(self, name=None):
            return None

        def hyperparameters(self):
            return {}

    err, _ = _terminal(monkeypatch)
    r = Tiny().train(str(tmp_path / "x.safetensors"))
    assert r.iterations_run == 3 and made and made[0][0][1] == "tiny"
    assert "tiny" in err.getvalue() and "3/3" in err.getvalue()


def test_host_bars_advance_with_every_bar(monkeypatch):
    """A host's display (ComfyUI's ProgressBar, registered by the node pack) advances with the core's bars."""
    from conceptgate.adapters import progress

    seen = []

    class HostBar:
        def __init__(self, total):
            seen.append(("new", total))

        def update(self, n):
            seen.append(("update", n))

    monkeypatch.setattr(progress, "_HOST_BARS", [])
    progress.register_host_bar(HostBar)
    b = progress.bar(3, "work")
    for _ in range(3):
        b.update(1)
    b.close()
    assert seen == [("new", 3), ("update", 1), ("update", 1), ("update", 1)]
    assert progress.bar(None, "no total") is not None  # without a total there is nothing to show in the host
    assert seen[-1] == ("update", 1)
