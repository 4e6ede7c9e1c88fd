"""Installer hook, run by AUTOMATIC1111/Forge (``extensions/<this>/install.py``) and by
ComfyUI-Manager after cloning. Only A1111's ``launch`` module can install packages safely into the
webui's environment; anywhere else this script checks and reports, and changes nothing.
"""

import importlib.util

# What the host-agnostic core and the host glue import. torch comes with every host.
REQUIRED = {"safetensors": "safetensors", "tqdm": "tqdm"}
OPTIONAL = {"diffusers": "diffusers"}  # only for the embedded toy model and the diffusers API


def missing(packages):
    return [pip for module, pip in packages.items() if importlib.util.find_spec(module) is None]


def main():
    try:
        import launch  # present only inside AUTOMATIC1111 / Forge
    except ImportError:
        launch = None
    todo = missing(REQUIRED)
    if launch is not None:
        for pip_name in todo:
            launch.run_pip(f"install {pip_name}", f"ConceptGate requirement: {pip_name}")
        return
    if todo:
        print(f"[ConceptGate] missing packages: {', '.join(todo)} (install them into this Python environment)")
    extra = missing(OPTIONAL)
    if extra:
        print(f"[ConceptGate] optional, for the toy model and diffusers API: {', '.join(extra)}")


main()
