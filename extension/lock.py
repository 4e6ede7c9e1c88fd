"""The operator lock in the webuis (A1111, Forge, reForge): the policy's erasers are in every generation's
stack, whatever the accordion, the API arguments or the ``<erase:...>`` tags say.

The policy file is named by ``$CONCEPTGATE_POLICY`` or the webui's ``--conceptgate-policy`` flag
(``preload.py``); the webui's settings page is not used, because any user of a shared webui can change
settings. Files are found next to the policy or in the webui's eraser folder. Every generation reads it
(cached until the file changes) in ``process``; a broken policy stops the generation through
:func:`.state.fail_closed`, like any other eraser that cannot be applied.
"""

from __future__ import annotations

import os

from ..adapters.policy import POLICY_ENV, PolicyCache

FLAG = "conceptgate_policy"  # shared.cmd_opts attribute of --conceptgate-policy
_POLICIES = PolicyCache()


def policy_path() -> str | None:
    env = os.environ.get(POLICY_ENV)
    if env is not None:
        return env or None
    try:
        from modules import shared

        return getattr(getattr(shared, "cmd_opts", None), FLAG, None) or None
    except ImportError:
        return None


def current_policy(library):
    """The policy in force (or None); raises :class:`~..adapters.policy.PolicyError` when it is unusable."""
    return _POLICIES.get(policy_path(), [library.folder])
