"""Stand-in for modules.infotext_utils: the quoting and parsing of generation parameters."""
import json
import re

re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def create_infotext(p, index=0):
    params = {"Steps": p.steps, "Seed": p.seed}
    params.update(p.extra_generation_params)
    for key, value in list(params.items()):  # processing.create_infotext: lists per image, callables(**locals())
        if isinstance(value, list):
            params[key] = value[index]
        elif callable(value):
            params[key] = value(p=p, index=index)
    text = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    neg = f"\nNegative prompt: {p.all_negative_prompts[index]}" if p.all_negative_prompts[index] else ""
    return f"{p.all_prompts[index]}{neg}\n{text}".strip()


def parse_generation_parameters(x):
    res = {}
    lines = x.strip().split("\n")
    last = lines[-1]
    prompt_lines, negative = lines[:-1], ""
    for i, line in enumerate(prompt_lines):
        if line.startswith("Negative prompt:"):
            negative = "\n".join([line[16:]] + prompt_lines[i + 1:]).strip()
            prompt_lines = prompt_lines[:i]
            break
    res["Prompt"] = "\n".join(prompt_lines)
    res["Negative prompt"] = negative
    for k, v in re_param.findall(last):
        res[k] = unquote(v)
    return res
