#!/bin/sh
# RabbitMQ users for a chiffon lab, one per role, with only the permissions that role uses.
#
#   deploy/rabbitmq-users.sh [--run] [-p VHOST] [--user NAME] [--rpc-results] ROLE [ARGS]
#
#   agent AGENT_ID POOLS   one agent: its pool queue(s) and its own queue, heartbeats
#                          (write only), its remote-control queue, events; default user
#                          chiffon-agent-AGENT_ID
#   orchestrator           heartbeats (and --copy queues), worker events, the drains it
#                          re-sends; default user chiffon-orchestrator
#   submitter POOLS        chiffon submit (to POOLS, or placed on any agent), drain and
#                          undrain; default user chiffon-submit
#   flower                 Flower: events and inspect/control; default user chiffon-flower
#
# POOLS: the agent_pool_name(s), separated by ',' or '|' (desktop_pool_1,gpu_rigs).
# Without --run the rabbitmqctl commands are printed, to read or paste; with --run they
# are run (an existing user keeps its password, only its permissions are set).
# The password is $CHIFFON_BROKER_PASSWORD, else a new random one (printed in the
# add_user command, or with --run as "password for USER: ...", once).
# --rpc-results: results go through rpc:// (the default of result_backend with a RabbitMQ
# broker). That needs write on amq.default for agents, which lets an agent publish into
# ANY queue of the vhost by name (docs/security.md, "Broker users and permissions"):
# prefer result_backend: redis://... on agents and submitters and leave this off.
#
# The names are those of chiffon_worker/wire.py and of Celery; the specification is
# tests/integration/test_broker_permissions.py, which runs this script.
set -eu

run=no
vhost=/
user=
rpc=no
usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --run) run=yes ;;
        -p|--vhost) [ $# -ge 2 ] || usage; vhost=$2; shift ;;
        --user) [ $# -ge 2 ] || usage; user=$2; shift ;;
        --rpc-results) rpc=yes ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) echo "rabbitmq-users.sh: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
    shift
done
[ $# -ge 1 ] || usage
role=$1
shift

# A name as chiffon accepts it (agent_id, agent_pool_name), as a regex matching only it.
name_regex() {
    case "$1" in
        ''|[._-]*|*[!A-Za-z0-9._-]*)
            echo "rabbitmq-users.sh: '$1' is not a chiffon name (letters, digits, . _ -)" >&2
            exit 2 ;;
    esac
    printf '%s' "$1" | sed 's/\./\\./g'
}
# POOLS ('a,b' or 'a|b') as a regex alternation.
pools_regex() {
    out=
    for pool in $(printf '%s' "$1" | tr ',|' '  '); do
        out="${out:+$out|}$(name_regex "$pool")"
    done
    [ -n "$out" ] || { echo "rabbitmq-users.sh: no pool named" >&2; exit 2; }
    printf '%s' "$out"
}

# Names from chiffon_worker/wire.py and Celery, as regexes.
HEARTBEATS='chiffon\.heartbeats'                 # wire.HEARTBEAT_QUEUE (queue and exchange)
COPIES='chiffon\.heartbeats\.copy\..+'           # wire.HEARTBEAT_COPY_PREFIX + registry id
AGENT_QUEUES='chiffon\.agent\..+'                # wire.AGENT_QUEUE_PREFIX + agent id
EVENT_QUEUES='chiffon\.orchestrator\.events\..+' # wire.ORCHESTRATOR_EVENTS_QUEUE_PREFIX + ...
EVENTS='celeryev'                                # wire.WORKER_EVENTS_EXCHANGE
FLOWER_EVENTS='celeryev\..+'                     # Flower's event queue: celeryev.<uuid>
MAILBOX='celery\.pidbox'                         # wire.CONTROL_MAILBOX + .pidbox (fanout)
REPLIES='reply\.celery\.pidbox'                  # the mailbox's reply exchange
REPLY_QUEUES='.+\.reply\.celery\.pidbox'         # a control client's reply queue
RPC_QUEUES='[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'  # rpc:// replies
DEFAULT_EXCHANGE='amq\.default'                  # rpc:// results are published through it

case "$role" in
    agent)
        [ $# -eq 2 ] || usage
        id=$(name_regex "$1")
        pools=$(pools_regex "$2")
        user=${user:-chiffon-agent-$1}
        own="chiffon\\.agent\\.$id"
        node="$id@.+\\.celery\\.pidbox"          # the worker <agent_id>@<host>'s queue
        results=
        [ "$rpc" = no ] || results="|$DEFAULT_EXCHANGE"
        configure="^($pools|$own|$EVENTS|$MAILBOX|$REPLIES|$node)\$"
        write="^($pools|$own|$HEARTBEATS|$EVENTS|$REPLIES|$node$results)\$"
        read="^($pools|$own|$MAILBOX|$node)\$" ;;
    orchestrator)
        [ $# -eq 0 ] || usage
        user=${user:-chiffon-orchestrator}
        configure="^($HEARTBEATS|$COPIES|$EVENT_QUEUES|$EVENTS|$MAILBOX|$REPLIES|$REPLY_QUEUES)\$"
        write="^($HEARTBEATS|$COPIES|$EVENT_QUEUES|$MAILBOX|$REPLY_QUEUES)\$"
        read="^($HEARTBEATS|$COPIES|$EVENT_QUEUES|$EVENTS|$REPLIES|$REPLY_QUEUES)\$" ;;
    submitter)
        [ $# -eq 1 ] || usage
        pools=$(pools_regex "$1")
        user=${user:-chiffon-submit}
        results=
        [ "$rpc" = no ] || results="|$RPC_QUEUES"
        configure="^($pools|$AGENT_QUEUES|$MAILBOX|$REPLIES|$REPLY_QUEUES$results)\$"
        write="^($pools|$AGENT_QUEUES|$MAILBOX|$REPLY_QUEUES)\$"
        read="^($pools|$AGENT_QUEUES|$REPLIES|$REPLY_QUEUES$results)\$" ;;
    flower)
        [ $# -eq 0 ] || usage
        user=${user:-chiffon-flower}
        configure="^($EVENTS|$FLOWER_EVENTS|$MAILBOX|$REPLIES|$REPLY_QUEUES)\$"
        write="^($FLOWER_EVENTS|$MAILBOX|$REPLY_QUEUES)\$"
        read="^($EVENTS|$FLOWER_EVENTS|$REPLIES|$REPLY_QUEUES)\$" ;;
    *)
        echo "rabbitmq-users.sh: unknown role '$role'" >&2
        usage ;;
esac

password=${CHIFFON_BROKER_PASSWORD:-}
if [ -z "$password" ]; then
    password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
fi

# a word in single quotes for the shell (no word here holds a single quote but a password)
quote() {
    printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

if [ "$run" = no ]; then
    echo "rabbitmqctl add_user $(quote "$user") $(quote "$password")"
    echo "rabbitmqctl set_permissions -p $(quote "$vhost") $(quote "$user") \\"
    echo "  $(quote "$configure") \\"
    echo "  $(quote "$write") \\"
    echo "  $(quote "$read")"
    exit 0
fi

# the password on stdin, not on the command line (ps would show it)
if failed=$(printf '%s\n' "$password" | rabbitmqctl -q add_user "$user" 2>&1 >/dev/null); then
    [ -n "${CHIFFON_BROKER_PASSWORD:-}" ] || echo "password for $user: $password"
else
    case "$failed" in
        *"already exists"*) echo "user $user exists: its password is left as it is" >&2 ;;
        *) printf '%s\n' "$failed" >&2; exit 1 ;;
    esac
fi
rabbitmqctl -q set_permissions -p "$vhost" "$user" "$configure" "$write" "$read"
