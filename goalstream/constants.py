"""Every stream, group, channel and key name goalstream uses, in one place."""

# Input streams, one per event type; the keys are the SPEC's channel names (CONTRACT 1).
TAG_ADDED = "contact.tag.added"
PAYMENT_COMPLETED = "payment.completed"
APPOINTMENT_BOOKED = "appointment.booked"
FORM_SUBMITTED = "form.submitted"
PIPELINE_STAGE_CHANGED = "pipeline.stage.changed"
DEFAULT_STREAMS = (
    TAG_ADDED,
    PAYMENT_COMPLETED,
    APPOINTMENT_BOOKED,
    FORM_SUBMITTED,
    PIPELINE_STAGE_CHANGED,
)

# The consumer group every worker joins; a new group starts at the stream's end ("$").
DEFAULT_GROUP = "goalstream"
DEFAULT_GROUP_START = "$"

# The one field of a stream entry that carries the JSON envelope; others are ignored.
DATA_FIELD = b"data"

# Output: one entry per achievement, delivered at least once (CONTRACT 3).
ACHIEVED_STREAM = "workflow.goal.achieved"
ACHIEVED_EVENT_TYPE = "workflow.goal.achieved"

# Dead letters: one entry per input entry that cannot be processed, with its reason.
DLQ_STREAM = "goalstream.dlq"

# PostgreSQL LISTEN/NOTIFY channel the goal triggers announce config changes on.
GOALS_CHANNEL = "goalstream_goals"

# Advisory lock key that serialises concurrent `goalstream migrate` runs ("goalstrm").
MIGRATION_LOCK_KEY = 0x676F616C7374726D
