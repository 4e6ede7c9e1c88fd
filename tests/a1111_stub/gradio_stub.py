"""Stand-in for the few gradio calls the accordion makes (component construction and listeners)."""

created = []


class _Block:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        self.value = kwargs.get("value", args[0] if args else None)
        self.listeners = []
        created.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _listen(self, event, fn, inputs=None, outputs=None, **kwargs):
        self.listeners.append((event, fn, list(inputs or []), list(outputs or [])))

    def change(self, fn, inputs=None, outputs=None, **kw): self._listen("change", fn, inputs, outputs)
    def input(self, fn, inputs=None, outputs=None, **kw): self._listen("input", fn, inputs, outputs)
    def click(self, fn, inputs=None, outputs=None, **kw): self._listen("click", fn, inputs, outputs)


class Accordion(_Block): pass
class Row(_Block): pass
class Column(_Block): pass
class Checkbox(_Block): pass
class Textbox(_Block): pass
class Dropdown(_Block):
    def __init__(self, choices=None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.choices = choices
class Button(_Block): pass
class Markdown(_Block): pass


class Slider(_Block):
    def __init__(self, minimum=0, maximum=100, value=None, step=None, **kwargs):
        super().__init__(value=value, **kwargs)
        self.minimum, self.maximum, self.step = minimum, maximum, step


def update(**kwargs):
    return dict(kwargs, __type__="update")
