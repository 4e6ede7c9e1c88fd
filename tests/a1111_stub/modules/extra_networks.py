"""Stand-in for modules.extra_networks (A1111's syntax and activation rules)."""
import re
from collections import defaultdict

re_extra_net = re.compile(r"<(\w+):([^>]+)>")
extra_network_registry = {}
REPORTED = []  # errors activate() raised, as the webui only displays them


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = [i for i in self.items if "=" not in i]
        self.named = dict(i.split("=", 1) for i in self.items if "=" in i)


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def initialize():
    extra_network_registry.clear()


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts):
    res, extra_data = [], None
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        if extra_data is None:  # the first prompt's networks only
            extra_data = parsed
        res.append(updated)
    return res, extra_data


def activate(p, extra_network_data):
    activated = []
    for name, params_list in extra_network_data.items():
        net = extra_network_registry.get(name)
        if net is None:
            print(f"Skipping unknown extra network: {name}")
            continue
        try:  # A1111 catches and displays activation errors (errors.display), then goes on
            net.activate(p, params_list)
        except Exception as e:
            REPORTED.append((name, e))
            print(f"activating extra network {name} with arguments {params_list}: {e}")
        activated.append(net)
    for name, net in extra_network_registry.items():
        if net not in activated:
            try:
                net.activate(p, [])
            except Exception as e:
                REPORTED.append((name, e))


def deactivate(p, extra_network_data):
    for name in extra_network_data:
        net = extra_network_registry.get(name)
        if net is not None:
            net.deactivate(p)
