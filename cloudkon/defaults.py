"""Defaults of remote mode, each with why it is what it is.

Owns the values that a command line shows in its --help and that the modules on boto3
(aws, claims, control, provisioning, workerinstance, s3staging, signing, remoteworker, sqsbackend) use:
the names of a fleet's AWS resources, its timings and how long what it leaves in AWS is
kept.  It imports nothing, so that every program's --help, and a missing boto3, say
what they should without loading boto3.  The limits of the AWS services themselves
(message size, batch size, longest long poll) are aws.py's, with the behaviour it
relies on.  What the values mean is the business of the modules that use them.
"""

from __future__ import annotations

# --- The AWS resources of a fleet ------------------------------------------------------------

# Shared by every scheduler and worker of an account and region unless told otherwise: a worker
# started with no option finds the bundles of a scheduler started with none.
DEFAULT_REQUEST_QUEUE = "cloudkon-requests"
DEFAULT_CLAIM_TABLE = "cloudkon-claims"
DEFAULT_CONTROL_TOPIC = "cloudkon-control"
# A restarted scheduler adopts the instances registered under its fleet's name.
DEFAULT_FLEET = "cloudkon"
DEFAULT_FLEET_TABLE = "cloudkon-fleet"
# Job files in the staging bucket go under this key prefix; a lifecycle rule deletes them after
# this many days (long enough to fetch a week's results, short enough not to pay for forgotten ones).
DEFAULT_STAGING_PREFIX = "jobs"
DEFAULT_RETENTION_DAYS = 7

# --- Timings ---------------------------------------------------------------------------------

# A bundle's lease: SQS visibility timeout and claim, renewed every third of it while it runs.
# Short enough that a dead worker's bundles run again within a minute, long enough that a
# renewal delayed by a slow call does not lose the lease.
DEFAULT_VISIBILITY_TIMEOUT = 60
# How long anything the fleet leaves in AWS is kept: messages in the queues made here (SQS allows
# up to 14 days), and, as long as a message may still come, the claims that recognise its late
# duplicate, the cancel marks of its job, the workers' thread counts and the signing keys that
# verify it.  One rule: whatever outlives a message must outlive it for as long.
RETENTION_SECONDS = 4 * 24 * 3600
# Bundles a worker runs at once (worker.py -t, --worker-threads), and what a scheduler assumes of a
# worker that recorded no thread count (yet).
DEFAULT_WORKER_THREADS = 4
# An EC2 worker without work terminates itself after this long: a few minutes of a small instance
# cost less than booting a new one for the next job.
DEFAULT_WORKER_IDLE_TIMEOUT = 300.0
# A worker that has run nothing for this long polls economically: one long poll at a time, on
# the request and the control queue in turn (3 calls a minute; a new bundle may wait out one
# control poll, up to 20 s).  Before, both queues are long-polled at once (6 calls a minute), so
# that a job arriving while workers are warm starts at once.  --economize-after.
DEFAULT_ECONOMIZE_AFTER_SECONDS = 120.0

# --- Provisioning ----------------------------------------------------------------------------

DEFAULT_INSTANCE_TYPE = "t3.micro"  # the smallest general-purpose type in the free tier
DEFAULT_MAX_WORKERS = 16  # a cap on what a runaway backlog can cost
# A live worker writes a heartbeat this often; one silent for DEFAULT_HEARTBEAT_TIMEOUT (six beats
# missed: not one slow call) is terminated and its bundles run elsewhere.
DEFAULT_HEARTBEAT_SECONDS = 5.0
DEFAULT_HEARTBEAT_TIMEOUT = 30.0
# An instance must boot, start its worker (cron @reboot) and send a first heartbeat in this time.
DEFAULT_BOOT_TIMEOUT = 300.0
# How often the scheduler compares the backlog with the fleet: a launch decision costs a listing.
DEFAULT_SCALE_INTERVAL = 5.0
