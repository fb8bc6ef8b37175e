#!/bin/sh
# The rabbitmq service's entrypoint (compose.yaml): starts the broker, then creates GetGoodTape's
# broker users with least permissions — the lines `getgoodtape provision` prints (docs/SECURITY.md;
# tests/core/test_bus_trust.py checks this file against them). Runs at every start: idempotent.
#
#   ggt-service          every actor, the gateway, `getgoodtape dlq`: the ggt.* resources (and amq.*
#                        for replies and private subscriptions); the only writer of ggt.commands
#   integrator-example   an outside system of tenant "example" (only when GGT_INTEGRATOR_PASSWORD is
#                        set): publishes convert.example to ggt.requests, reads job.example.# from
#                        ggt.events through its own queues integrator.example.*
# The image's default user (RABBITMQ_DEFAULT_USER, the operator's) is left as it is.
set -eu

docker-entrypoint.sh rabbitmq-server &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true' TERM INT

rabbitmqctl await_startup --timeout 120 >/dev/null

: "${RABBITMQ_SERVICE_PASSWORD:?set RABBITMQ_SERVICE_PASSWORD}"
rabbitmqctl add_user ggt-service "$RABBITMQ_SERVICE_PASSWORD" >/dev/null 2>&1 \
  || rabbitmqctl change_password ggt-service "$RABBITMQ_SERVICE_PASSWORD" >/dev/null
rabbitmqctl set_permissions -p / ggt-service '^(ggt\..*|amq\..*)$' '^(ggt\..*|amq\..*)$' '^(ggt\..*|amq\..*)$'

if [ -n "${GGT_INTEGRATOR_PASSWORD:-}" ]; then
  rabbitmqctl add_user integrator-example "$GGT_INTEGRATOR_PASSWORD" >/dev/null 2>&1 \
    || rabbitmqctl change_password integrator-example "$GGT_INTEGRATOR_PASSWORD" >/dev/null
  rabbitmqctl set_permissions -p / integrator-example '^integrator\.example\..*$' '^(ggt\.requests|integrator\.example\..*)$' '^(ggt\.events|integrator\.example\..*)$'
  rabbitmqctl set_topic_permissions -p / integrator-example ggt.requests '^convert\.example$' '^$'
  rabbitmqctl set_topic_permissions -p / integrator-example ggt.events '^$' '^job\.example\.'
fi

# the broker's exit is the container's: wait again after a signal interrupted the first wait
wait "$server" || true
wait "$server"
