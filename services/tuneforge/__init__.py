"""tuneforge: a fine-tuning platform — five gRPC services over protobuf and NATS JetStream."""

__version__ = "0.1.0"
