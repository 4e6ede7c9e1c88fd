"""Webui start-up hook (AUTOMATIC1111 / Forge / reForge read ``preload.py`` of every extension before
parsing the command line): the operator's ``--conceptgate-policy`` flag."""


def preload(parser):
    parser.add_argument("--conceptgate-policy", type=str, default=None,
                        help="ConceptGate operator policy (JSON): erasers applied to every image, which users "
                             "cannot lower or remove. $CONCEPTGATE_POLICY takes precedence.")
