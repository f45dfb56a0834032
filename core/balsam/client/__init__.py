"""HTTP client for the Balsam REST service and the stored login (``client.yml``)."""

from .rest import APIError, AuthenticationError, RESTClient, ServerUnavailable, load_client, on_credential_refused
from .transport import TransportRefused
from .settings import NOT_LOGGED_IN, ClientSettings, ClientSettingsError, NotLoggedIn, balsam_home, client_path

# Balsam 0.7 wrote these class paths into client.yml; they name the same client here.
BasicAuthRequestsClient = RESTClient
OAuthRequestsClient = RESTClient
RequestsClient = RESTClient

__all__ = [
    "APIError",
    "AuthenticationError",
    "BasicAuthRequestsClient",
    "ClientSettings",
    "ClientSettingsError",
    "NOT_LOGGED_IN",
    "NotLoggedIn",
    "OAuthRequestsClient",
    "RESTClient",
    "RequestsClient",
    "ServerUnavailable",
    "balsam_home",
    "client_path",
    "load_client",
    "on_credential_refused",
    "TransportRefused",
]
