"""Events over RabbitMQ and PostgreSQL: topology, the outbox relay, grants, resume, publishing."""
