"""imagegate's settings: declared once as dataclass fields, loaded by one loader.

A package of its own (standard library only) so that both the service's Config and
the front's GatewayConfig can declare their settings with it: the gateway never
imports `service`, and the service's core never imports `gateway`."""
