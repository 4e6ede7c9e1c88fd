"""The "ConceptGate" accordion (gradio, imported only when the webui builds its UI).

The script's arguments are six stable components (see :mod:`.params`): the per-eraser toggles and
strength sliders drive the ``erasers`` text box, and the text box drives them back (so infotext
paste and API calls use one field). Eraser rows are created for the files present when the UI is
built; files added later are usable by name in the text box or with ``<erase:name:strength>``.
"""

from __future__ import annotations

import hashlib
import re

from ..adapters.limits import clean_name
from . import callbacks
from .params import MAX_NAME, markdown_text
from .params import GATE_RULES, KEY, KEY_COMBINE, KEY_COND_ONLY, KEY_GATE, KEY_HASHES, KEY_PRESET, NO_PRESET, TITLE
from .params import format_selection, parse_selection, restore
from ..adapters.stack import COMBINE_MODES

MAX_ROWS = 48


def build(script, is_img2img):
    import gradio as gr

    lib = callbacks.library()
    usable, unavailable = lib.listing()
    locked, policy_note = _locked_rows(lib, usable)
    rows = [n for n in usable if n not in locked][:MAX_ROWS]
    toggles, sliders = [], []
    with gr.Accordion(TITLE, open=False, elem_id=script.elem_id("conceptgate")):
        enabled = gr.Checkbox(False, label="Use the erasers and preset selected here (<erase:name:strength> in the prompt always works)",
                              elem_id=script.elem_id("conceptgate_enabled"))
        with gr.Row():
            preset = gr.Dropdown([NO_PRESET] + list(lib.presets()), value=NO_PRESET, label="Stack preset",
                                 elem_id=script.elem_id("conceptgate_preset"))
            refresh = gr.Button("Refresh presets", elem_id=script.elem_id("conceptgate_refresh"))
        if policy_note:
            gr.Markdown(policy_note)
        for name, strength in locked.items():  # shown greyed: the operator's entries cannot be changed here
            with gr.Row():
                label = clean_name(name, MAX_NAME)
                gr.Checkbox(True, label=f"{label} (locked by the operator)", interactive=False,
                            elem_id=script.elem_id(f"conceptgate_locked_{_id(name)}"))
                gr.Slider(0.0, 2.0, value=strength, step=0.05, label=f"{label} strength (locked)", interactive=False,
                          elem_id=script.elem_id(f"conceptgate_locked_strength_{_id(name)}"))
        if not rows and not locked:
            gr.Markdown(f"No erasers in {markdown_text(lib.folder, 1000)}.")
        for name in rows:
            with gr.Row():
                label = clean_name(name, MAX_NAME)
                toggles.append(gr.Checkbox(False, label=label, elem_id=script.elem_id(f"conceptgate_on_{_id(name)}")))
                sliders.append(gr.Slider(0.0, 2.0, value=1.0, step=0.05, label=f"{label} strength",  # no negative: it amplifies
                                         elem_id=script.elem_id(f"conceptgate_strength_{_id(name)}")))
        erasers = gr.Textbox("", label="Selected erasers (name:strength, ...)", lines=1,
                             elem_id=script.elem_id("conceptgate_erasers"))
        with gr.Row():
            combine = gr.Dropdown(list(COMBINE_MODES), value="additive", label="Combine",
                                  elem_id=script.elem_id("conceptgate_combine"))
            gate = gr.Dropdown(list(GATE_RULES), value=GATE_RULES[0], label="Gate rule (context = by meaning; ft = official Facilitated Transport)",
                               elem_id=script.elem_id("conceptgate_gate"))
            cond_only = gr.Checkbox(False, label="Conditional rows only (non-official)",
                                    elem_id=script.elem_id("conceptgate_cond_only"))
        if unavailable:
            gr.Markdown("Not usable in the webui yet: " + "; ".join(f"{markdown_text(n)} ({markdown_text(why, 400)})"
                                                                      for n, why in unavailable.items()))
        last = gr.Textbox(callbacks.LAST["text"], label="Gates of the last generation", lines=3, interactive=False,
                          elem_id=script.elem_id("conceptgate_last"))
        show_last = gr.Button("Show gates of the last generation", elem_id=script.elem_id("conceptgate_show_last"))

    def rows_to_text(text, *values):
        on, strength = values[:len(rows)], values[len(rows):]
        typed = [(n, s) for n, s in _safe_parse(text) if n not in rows]
        return format_selection([(n, float(s)) for n, o, s in zip(rows, on, strength) if o] + typed)

    def text_to_rows(text):
        chosen = dict(_safe_parse(text))
        return ([gr.update(value=n in chosen) for n in rows]
                + [gr.update(value=chosen[n]) if n in chosen else gr.update() for n in rows])

    for comp in toggles + sliders:
        comp.input(rows_to_text, inputs=[erasers] + toggles + sliders, outputs=[erasers])
    if rows:
        erasers.change(text_to_rows, inputs=[erasers], outputs=toggles + sliders)
    refresh.click(lambda: gr.update(choices=[NO_PRESET] + list(callbacks.library().presets())), inputs=[], outputs=[preset])
    show_last.click(lambda: callbacks.LAST["text"], inputs=[], outputs=[last])

    def rename(name, sha12):
        return callbacks.library().name_for_hash(name, sha12)

    script.infotext_fields = [
        (enabled, lambda d: restore(d).enabled),
        (erasers, lambda d: format_selection(restore(d, rename).erasers)),
        (preset, lambda d: restore(d).preset),
        (combine, lambda d: restore(d).combine),
        (gate, lambda d: restore(d).gate),
        (cond_only, lambda d: restore(d).cond_only),
    ]
    script.paste_field_names = [KEY, KEY_HASHES, KEY_PRESET, KEY_COMBINE, KEY_GATE, KEY_COND_ONLY]
    return [enabled, erasers, preset, combine, gate, cond_only]


def _locked_rows(lib, usable) -> tuple[dict[str, float], str]:
    """Library names of the operator's locked erasers (with their strengths), and a note for the accordion."""
    import os

    from .lock import current_policy

    try:
        policy = current_policy(lib)
    except Exception as e:  # shown, and every generation stops with the same message
        return {}, f"**Operator policy unusable: every generation stops.** {markdown_text(str(e), 400)}"
    if policy is None:
        return {}, ""
    locked = {}
    for name in usable:
        path = os.path.realpath(lib.path_of(name))
        for e in policy.entries:
            if e.eraser.source and os.path.realpath(e.eraser.source) == path:
                locked[name] = e.strength
    names = ", ".join(f"{markdown_text(e.eraser.name)} x{e.strength:g}" for e in policy.entries)
    return locked, f"Locked by the server's operator (always on, whatever is selected here or in the prompt): {names}"


def _id(name: str) -> str:
    """An HTML element id fragment from a name (the name itself when it is already a plain identifier)."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        return name
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] + "_" + hashlib.sha1(name.encode()).hexdigest()[:8]


def _safe_parse(text):
    try:
        return parse_selection(text)
    except ValueError:
        return []
