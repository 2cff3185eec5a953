# The README's commands.

.PHONY: up test lint fmt clippy

# Everything on embedded defaults: model pulled, Postgres started and
# migrated, gateway on 127.0.0.1:8080. Prints the URL and an API key.
up:
	cargo run --release -p flywheel -- up

# Every test, against real Postgres and the real model.
test:
	scripts/test.sh

lint: fmt clippy

fmt:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets -- -D warnings
