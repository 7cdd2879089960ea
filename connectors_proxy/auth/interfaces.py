# -*- test-case-name: tests.test_credentials,tests.test_kube_identity -*-
"""
The seams of the proxy that tests replace with fakes, and that each mode
(standalone, cluster) implements its own way.
"""

from __future__ import annotations

from attrs import frozen
from zope.interface import Interface


@frozen
class Identity:
    """
    Who a client is, as its token says (TokenReview's C{status.user}).

    @ivar pod: the Pod the token was issued for, when the token says so
        (TokenReview's C{user.extra["authentication.kubernetes.io/pod-name"]}):
        pod-scoped grants (C{connectors/proxy/v1/pod/PODNS/PODNAME}) apply to it.
    """

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    pod: str | None = None

    @property
    def service_account(self) -> tuple[str, str] | None:
        """C{(namespace, name)} for C{system:serviceaccount:NS:SA} users."""
        parts = self.username.split(":")
        if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
            return parts[2], parts[3]
        return None


class VerifierUnavailable(Exception):
    """
    An L{IIdentityVerifier} cannot answer right now (the API server is
    away): the request gets a 503, and since that is expected during an
    outage (which the verifier logs once), no traceback is logged per request.
    """


class IIdentityVerifier(Interface):
    """
    Decides who a client token belongs to, and whether that identity may use
    a Connector.  Standalone mode reads a static token file; cluster mode asks
    the API server (TokenReview, SubjectAccessReview).
    """

    def authenticate(token: str) -> Deferred[Identity | None]:  # type: ignore[name-defined]  # noqa: F821
        """
        The identity that C{token} proves, or C{None} when the token is not
        valid.  Fails only when the answer cannot be had (API server away).
        """

    def authorize(identity: Identity, namespace: str, name: str) -> Deferred[bool]:  # type: ignore[name-defined]  # noqa: F821
        """Whether C{identity} may use Connector C{namespace/name}."""
