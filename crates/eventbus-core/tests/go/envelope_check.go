// Decodes envelopes the way Go services on the original SDK do, with Go's
// own encoding/json, and writes back what Go would put on the wire.
//
// Input: one JSON envelope per line on stdin. Output: one JSON object per
// line: {"current": <re-encoded or null>, "current_error": "...",
// "old": <re-encoded or null>, "old_error": "..."}, where "current" is the
// struct of the SDK's current releases (tenant_id an integer) and "old" the
// struct of its releases from late October 2025 to February 2026
// (tenant_id a string). Only the standard library: run with `go run`.
package main

import (
	"bufio"
	"encoding/json"
	"os"
	"time"
)

type Envelope struct {
	EventID       string          `json:"event_id"`
	AggregateID   string          `json:"aggregate_id"`
	EventType     string          `json:"event_type"`
	EventVersion  int64           `json:"event_version"`
	Timestamp     time.Time       `json:"timestamp"`
	TraceID       string          `json:"trace_id,omitempty"`
	CorrelationID string          `json:"correlation_id,omitempty"`
	TenantID      int             `json:"tenant_id,omitempty"`
	Payload       json.RawMessage `json:"payload"`
}

type OldEnvelope struct {
	EventID       string          `json:"event_id"`
	AggregateID   string          `json:"aggregate_id"`
	EventType     string          `json:"event_type"`
	EventVersion  int64           `json:"event_version"`
	Timestamp     time.Time       `json:"timestamp"`
	TraceID       string          `json:"trace_id,omitempty"`
	CorrelationID string          `json:"correlation_id,omitempty"`
	TenantID      string          `json:"tenant_id,omitempty"`
	Payload       json.RawMessage `json:"payload"`
}

type Result struct {
	Current      json.RawMessage `json:"current"`
	CurrentError string          `json:"current_error,omitempty"`
	Old          json.RawMessage `json:"old"`
	OldError     string          `json:"old_error,omitempty"`
}

func roundTrip(line []byte, into interface{}) (json.RawMessage, string) {
	if err := json.Unmarshal(line, into); err != nil {
		return json.RawMessage("null"), err.Error()
	}
	out, err := json.Marshal(into)
	if err != nil {
		return json.RawMessage("null"), err.Error()
	}
	return out, ""
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<24)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var r Result
		r.Current, r.CurrentError = roundTrip(in.Bytes(), &Envelope{})
		r.Old, r.OldError = roundTrip(in.Bytes(), &OldEnvelope{})
		if err := out.Encode(r); err != nil {
			os.Exit(1)
		}
	}
	if err := in.Err(); err != nil {
		os.Exit(2)
	}
}
