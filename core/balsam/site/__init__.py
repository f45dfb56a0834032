"""The site agent and its built-in agent modules.

``python -m balsam.site`` runs the agent of the current site (``balsam site start`` daemonizes it).
Third-party agent modules subclass :class:`balsam.site.AgentModule`.
"""

from .module import AgentModule

__all__ = ["AgentModule"]
