"""
The twistd plugin C{connectors-proxy}.  It names its module as a string, so
listing plugins imports nothing of the proxy.
"""

from twisted.application.service import ServiceMaker

connectors_proxy = ServiceMaker(
    "connectors-proxy",
    "connectors_proxy.tap",
    "Secretless proxy to Git servers, OCI registries and REST APIs for Kubernetes workloads.",
    "connectors-proxy",
)
