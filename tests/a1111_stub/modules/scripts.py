"""Stand-in for modules.scripts: the Script base class and AlwaysVisible.

Like the real ``ScriptRunner`` (modules/scripts.py: ``try: script.process(p, ...) except Exception:
errors.report(...)``), every stage's exceptions are caught and only reported (here: printed and kept in
``REPORTED``); a script that must stop a generation has to do it another way.
"""
import sys
import traceback

REPORTED = []  # (stage, exception) of every error a script stage raised


class AlwaysVisibleType:
    pass


AlwaysVisible = AlwaysVisibleType()


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    group = None
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_hr(self, p, *args):
        pass

    def elem_id(self, item_id):
        return f"{'img2img' if self.is_img2img else 'txt2img'}_script_{item_id}"


class ScriptRunnerStub:
    """Calls the always-on scripts' stages with their slice of p.script_args (scripts.py)."""

    def __init__(self, scripts, forge=False):
        self.alwayson_scripts = scripts
        self.forge = forge

    def _each(self, stage, p, *extra, **kwargs):
        for s in self.alwayson_scripts:
            fn = getattr(s, stage, None)
            if fn is None:
                continue
            try:
                fn(p, *extra, *p.script_args[s.args_from:s.args_to], **kwargs)
            except Exception as e:  # errors.report(f"Error running {stage}: {script.filename}", exc_info=True)
                REPORTED.append((stage, e))
                print(f"Error running {stage}: {s.filename}", file=sys.stderr)
                traceback.print_exc()

    def before_process(self, p): self._each("before_process", p)
    def process(self, p): self._each("process", p)
    def before_process_batch(self, p, **kw): self._each("before_process_batch", p, **kw)
    def process_batch(self, p, **kw): self._each("process_batch", p, **kw)
    def process_before_every_sampling(self, p, **kw):
        if self.forge:  # added by Forge (commit 848f28af); A1111 has no such stage
            self._each("process_before_every_sampling", p, **kw)
    def postprocess_batch(self, p, images, **kw): self._each("postprocess_batch", p, images=images, **kw)
    def postprocess(self, p, processed): self._each("postprocess", p, processed)
