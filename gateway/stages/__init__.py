"""Pipeline stages: one behaviour per module, wired in order by `gateway.app`."""
