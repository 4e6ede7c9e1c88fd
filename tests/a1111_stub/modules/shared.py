"""Stand-in for modules.shared: options, OptionInfo, models_path, the loaded model."""
import os
import tempfile


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False, category_id=None):
        self.default, self.label, self.section = default, label, section


class Options:
    def __init__(self):
        object.__setattr__(self, "data", {"batch_cond_uncond": True, "CLIP_stop_at_last_layers": 1})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, key):
        if key in self.data:
            return self.data[key]
        raise AttributeError(key)

    def __setattr__(self, key, value):
        self.data[key] = value


opts = Options()
models_path = os.path.join(tempfile.gettempdir(), "a1111_stub_models")
sd_model = None


class State:
    interrupted = False
    sampling_step = 0
    sampling_steps = 0


state = State()
