"""The web dashboard, served by the balsam server itself under ``/dashboard/`` (see docs/dashboard.md).

Pages are rendered on the server (Jinja2) from the same query logic as the REST API and work without
JavaScript; a small script refreshes them live and draws the throughput and utilization plots with
the vendored uPlot library (``static/vendor/uplot``). Browser logins are signed cookie sessions with
CSRF tokens (:mod:`.session`); the password check is the server's own
(:func:`balsam.server.auth.authenticate_password`).
"""

from .views import dashboard_routes

__all__ = ["dashboard_routes"]
