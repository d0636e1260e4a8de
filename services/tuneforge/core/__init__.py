"""What every service needs once: settings, gRPC helpers, the NATS bus, databases, storage."""
