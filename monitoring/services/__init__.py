"""Monitoring writes, one module per concern; everything public is importable from here.

- ``collection``: scrapes → raw samples and rollups, prediction log pulls, probes, retention
- ``feedback``: ground truth → pairs and per-minute confusion counts
- ``drift``: references and hourly input counts
- ``alerts``: rules, their state machine, notifications, rollback
"""

from .alerts import (
    RULE_FIELDS,
    Evaluation,
    alert_rule_create,
    alert_rule_delete,
    alert_rule_evaluate,
    alert_rule_update,
    alert_rule_validate,
    alert_rules_evaluate,
    notification_deliver,
    notifications_requeue,
)
from .collection import (
    TrafficIn,
    deployment_probe,
    deployment_pull,
    deployment_scrape,
    deployments_to_collect,
    deployments_to_probe,
    predictions_ingest,
    probe_payload,
    probe_record,
    retention_apply,
    scrape_record,
    traffic_ingest,
)
from .drift import dataset_from_file, drift_reference_upload, example_columns
from .feedback import FEEDBACK_MAX_ITEMS, FeedbackResult, feedback_record, feedback_validate

__all__ = [
    "FEEDBACK_MAX_ITEMS",
    "RULE_FIELDS",
    "Evaluation",
    "FeedbackResult",
    "TrafficIn",
    "alert_rule_create",
    "alert_rule_delete",
    "alert_rule_evaluate",
    "alert_rule_update",
    "alert_rule_validate",
    "alert_rules_evaluate",
    "deployment_probe",
    "deployment_pull",
    "deployment_scrape",
    "deployments_to_collect",
    "dataset_from_file",
    "deployments_to_probe",
    "drift_reference_upload",
    "example_columns",
    "feedback_record",
    "feedback_validate",
    "notification_deliver",
    "notifications_requeue",
    "predictions_ingest",
    "probe_payload",
    "probe_record",
    "retention_apply",
    "scrape_record",
    "traffic_ingest",
]
