"""Stand-in for modules.script_callbacks: global registration lists and the CFG params object."""
from collections import defaultdict

callback_map = defaultdict(list)


def _add(kind, fn):
    callback_map[kind].append(fn)


def on_before_ui(fn): _add("before_ui", fn)
def on_ui_settings(fn): _add("ui_settings", fn)
def on_cfg_denoiser(fn): _add("cfg_denoiser", fn)
def on_cfg_denoised(fn): _add("cfg_denoised", fn)
def on_cfg_after_cfg(fn): _add("cfg_after_cfg", fn)
def on_script_unloaded(fn): _add("script_unloaded", fn)
def on_model_loaded(fn): _add("model_loaded", fn)
def on_infotext_pasted(fn): _add("infotext_pasted", fn)


def before_ui_callback():
    for fn in callback_map["before_ui"]:
        fn()


def ui_settings_callback():
    for fn in callback_map["ui_settings"]:
        fn()


def script_unloaded_callback():
    for fn in callback_map["script_unloaded"]:
        fn()


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


REPORTED = []  # callback errors: the webui's report_exception logs them and sampling goes on


def cfg_denoiser_callback(params):
    for fn in callback_map["cfg_denoiser"]:
        try:
            fn(params)
        except Exception as e:
            REPORTED.append(("cfg_denoiser", e))


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x, self.sampling_step, self.total_sampling_steps, self.inner_model = x, sampling_step, total_sampling_steps, inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x, self.sampling_step, self.total_sampling_steps = x, sampling_step, total_sampling_steps


def cfg_denoised_callback(params):
    for fn in callback_map["cfg_denoised"]:
        try:
            fn(params)
        except Exception as e:
            REPORTED.append(("cfg_denoised", e))


def cfg_after_cfg_callback(params):
    for fn in callback_map["cfg_after_cfg"]:
        try:
            fn(params)
        except Exception as e:
            REPORTED.append(("cfg_after_cfg", e))
