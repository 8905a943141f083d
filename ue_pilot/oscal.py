"""OSCAL assessment results from an org's evidence records.

The document follows the OSCAL assessment-results model of NIST's OSCAL
1.2.3 JSON schema, which the tests validate it against.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime

from ue_pilot.evidence_records import EvidenceError
from ue_pilot.evidence_verify import ChainReport, StoredRecord

OSCAL_VERSION = "1.2.3"
# uuid5 namespace of every UUID in an export, so the same records always
# produce the same document.
OSCAL_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ue-pilot:evidence")
PROPERTY_NAMESPACE = "urn:ue-pilot:evidence"
ASSESSMENT_PLAN_HREF = "urn:ue-pilot:assessment-plan:runbook"
STATES = {"pass": ("satisfied", "pass"), "fail": ("not-satisfied", "fail"),
          "inconclusive": ("not-satisfied", "other")}
MAX_OBSERVED_CHARS = 4000


def oscal_uuid(*parts: object) -> str:
    return str(uuid.uuid5(OSCAL_NAMESPACE, "/".join(str(part) for part in parts)))


def oscal_token(text: str) -> str:
    """Return `text` as an OSCAL token (letters, digits, '.', '-', '_')."""
    token = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    return token if re.match(r"^[A-Za-z_]", token) else f"_{token}"


def oscal_time(text: str) -> str:
    """Return an ISO timestamp in UTC with a Z suffix, as OSCAL requires a zone."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def to_oscal(report: ChainReport) -> dict:
    """Convert an org's records into one OSCAL assessment-results document.

    Each record becomes one result, in sequence order. Each check becomes an
    observation (method TEST) whose evidence links are the `urn:sha256:` of the
    record and of its artifact blobs. It also becomes a finding on the
    objective named by the check id: satisfied when the check passed, and
    not-satisfied when it failed or was inconclusive, the latter with a
    remark. Every UUID is derived from record hashes, so the same records
    give the same document.
    """
    chain = report.chain()
    if not chain:
        raise EvidenceError(f"no evidence records of {report.org} to export")
    last = chain[-1]
    document = {
        "uuid": oscal_uuid("assessment-results", report.org, last.sha256),
        "metadata": {
            "title": f"UE pilot evidence of {report.org}",
            "last-modified": oscal_time(last.content["recorded"]),
            "version": f"sequence-{last.sequence}",
            "oscal-version": OSCAL_VERSION,
            "props": [
                oscal_prop("org", report.org),
                oscal_prop("chain-head-sha256", last.sha256),
            ],
            "remarks": "Exported by ue-pilot from the hash-chained evidence "
            "records in Blob Storage. Verify with `ue-pilot evidence verify`.",
        },
        "import-ap": {
            "href": ASSESSMENT_PLAN_HREF,
            "remarks": "No OSCAL assessment plan is published; the checks "
            "implement the UE pilot runbook.",
        },
        "results": [oscal_result(record) for record in chain],
    }
    return {"assessment-results": document}


def oscal_prop(name: str, value: object) -> dict:
    return {"name": name, "ns": PROPERTY_NAMESPACE, "value": str(value)}


def oscal_result(record: StoredRecord) -> dict:
    """Return the OSCAL result of one record, with its observations and findings."""
    content = record.content
    recorded = oscal_time(content["recorded"])
    started = (content.get("run") or {}).get("started") or content["recorded"]
    trigger = (content.get("trigger") or {}).get("kind", "unknown")
    target = content.get("target") or {}
    result = {
        "uuid": oscal_uuid(record.sha256, "result"),
        "title": f"{content['family']} run, sequence {content['sequence']}",
        "description": (
            f"{content['family']} of {content['org']} against "
            f"{target.get('base_url', 'the pilot')}, triggered by {trigger}; "
            f"verdict {content.get('verdict')}."
        ),
        "start": oscal_time(started),
        "end": recorded,
        "props": [
            oscal_prop("sequence", content["sequence"]),
            oscal_prop("family", content["family"]),
            oscal_prop("trigger", trigger),
            oscal_prop("verdict", content.get("verdict")),
            oscal_prop("record-sha256", record.sha256),
        ],
        "reviewed-controls": {
            "control-selections": [{
                "description": "The runbook checks this run performed.",
                "include-all": {},
            }],
        },
    }

    observations, findings = [], []
    evidence = evidence_links(record)
    for index, check in enumerate(content.get("checks", [])):
        observation_uuid = oscal_uuid(record.sha256, index, "observation")
        finding_uuid = oscal_uuid(record.sha256, index, "finding")
        observations.append(
            oscal_observation(check, observation_uuid, recorded, evidence)
        )
        findings.append(oscal_finding(check, finding_uuid, observation_uuid))
    if observations:
        result["observations"] = observations
        result["findings"] = findings
    return result


def evidence_links(record: StoredRecord) -> list[dict]:
    """Return `urn:sha256:` links to the record and to each of its artifact blobs."""
    links = [{
        "href": f"urn:sha256:{record.sha256}",
        "description": f"Evidence record {record.relative_name}",
    }]
    for artifact in record.content.get("artifacts", []):
        links.append({
            "href": f"urn:sha256:{artifact['sha256']}",
            "description": f"Artifact {artifact['name']}: blob {artifact['blob']}",
        })
    return links


def oscal_observation(
    check: dict, observation_uuid: str, collected: str, evidence: list[dict]
) -> dict:
    observed = json.dumps(check.get("observed") or {}, sort_keys=True)
    if len(observed) > MAX_OBSERVED_CHARS:
        observed = (observed[:MAX_OBSERVED_CHARS]
                    + " ... (truncated; the record contains every value)")
    scope = check.get("org") or "the deployment"
    return {
        "uuid": observation_uuid,
        "title": check["id"],
        "description": f"{check['id']} on {scope}: {check['status']}. "
        f"{check.get('summary') or ''}".strip(),
        "props": [oscal_prop("status", check["status"])],
        "methods": ["TEST"],
        "relevant-evidence": evidence,
        "collected": collected,
        "remarks": f"Observed values: {observed}",
    }


def oscal_finding(check: dict, finding_uuid: str, observation_uuid: str) -> dict:
    state, reason = STATES[check["status"]]
    status: dict[str, str] = {"state": state, "reason": reason}
    if check["status"] == "inconclusive":
        status["remarks"] = (
            "Inconclusive: the check could not prove the objective, so it is "
            "reported as not satisfied."
        )
    return {
        "uuid": finding_uuid,
        "title": check["id"],
        "description": check.get("summary") or f"{check['id']}: {check['status']}",
        "target": {
            "type": "objective-id",
            "target-id": oscal_token(check["id"]),
            "status": status,
        },
        "related-observations": [{"observation-uuid": observation_uuid}],
    }
