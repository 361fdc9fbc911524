"""Secrets servicer: thin — decode, call core, encode. Every call is audited."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import grpc

from nexus.api.calls import rpc_call
from nexus.api.convert import stored_time
from nexus.audit import AuditLog
from nexus.core.errors import NexusError
from nexus.core.secrets import ImportEntry, ImportResult, SecretsService
from spike.v1 import secrets_pb2 as pb
from spike.v1 import secrets_pb2_grpc as pb_grpc

MAX_LISTED_FAILURES = 1000
"""Failures detailed in one import response (a path is at most 2 KiB of UTF-8, a message
a few hundred bytes: the response stays well below the 4 MiB message limit); the rest are
counted."""


def import_response(result: ImportResult) -> pb.ImportSecretsResponse:
    listed = result.failures[:MAX_LISTED_FAILURES]
    return pb.ImportSecretsResponse(
        imported=len(result.imported), skipped=len(result.skipped),
        failed=len(result.failures),
        failures=[pb.ImportFailure(line=f.line, path=f.path, kind=f.kind, message=f.message)
                  for f in listed],
        failures_not_listed=len(result.failures) - len(listed))


class SecretsServicer(pb_grpc.SecretsServicer):
    def __init__(self, secrets: SecretsService, audit: AuditLog) -> None:
        self._secrets = secrets
        self._audit = audit

    def Put(self, request: pb.PutSecretRequest,
            context: grpc.ServicerContext) -> pb.PutSecretResponse:
        cas = request.cas if request.HasField("cas") else None
        with rpc_call(context, self._audit, "secret.put", request.path) as caller:
            version = self._secrets.put(caller, request.path, dict(request.data), cas)
            return pb.PutSecretResponse(path=request.path, version=version)

    def Import(self, request_iterator: Iterator[pb.ImportSecretsRequest],
               context: grpc.ServicerContext) -> Iterator[pb.ImportSecretsResponse]:
        """One durable commit and one answer per request. Every entry is audited as a put
        is (after its batch committed: written, skipped or refused); a call that fails as a
        whole (sealed, stale, a batch too large, the store) is audited with its outcome."""
        with rpc_call(context) as caller:
            try:
                for request in request_iterator:
                    entries = [ImportEntry(e.line, e.path, dict(e.data))
                               for e in request.entries]
                    result = self._secrets.import_batch(caller, entries,
                                                        skip_existing=request.skip_existing)
                    self._audit_batch(caller, result)
                    yield import_response(result)
            except grpc.RpcError:
                # The caller went away (cancelled, or its connection closed): nothing is
                # left to answer. Every batch taken before is committed and audited.
                self._audit.record("secret.import", caller=caller, outcome="cancelled")
            except Exception as exc:
                outcome = exc.kind.value if isinstance(exc, NexusError) else "internal_error"
                self._audit.record("secret.import", caller=caller, outcome=outcome)
                raise

    def _audit_batch(self, caller: str, result: ImportResult) -> None:
        """One event per entry, as a put's (written, skipped or refused), in one append."""
        skipped = {"result": "skipped"}
        events: list[tuple[str, str, Mapping[str, Any] | None]] = [
            (path, "ok", None) for path in result.imported]
        events += [(path, "ok", skipped) for path in result.skipped]
        events += [(f.path, f.kind, {"line": f.line}) for f in result.failures]
        self._audit.record_many("secret.import", caller=caller, events=events)

    def Get(self, request: pb.GetSecretRequest,
            context: grpc.ServicerContext) -> pb.GetSecretResponse:
        with rpc_call(context, self._audit, "secret.get", request.path) as caller:
            found = self._secrets.get(caller, request.path, request.version or None)
            return pb.GetSecretResponse(path=found.path, version=found.version, data=found.data,
                                        created=stored_time(found.created, found.path))

    def List(self, request: pb.ListSecretsRequest,
             context: grpc.ServicerContext) -> pb.ListSecretsResponse:
        with rpc_call(context, self._audit, "secret.list", request.prefix) as caller:
            page = self._secrets.list_page(caller, request.prefix, request.page_size,
                                           request.page_token)
            return pb.ListSecretsResponse(paths=page.paths, next_page_token=page.next_token)

    def Delete(self, request: pb.DeleteSecretRequest,
               context: grpc.ServicerContext) -> pb.DeleteSecretResponse:
        with rpc_call(context, self._audit, "secret.delete", request.path,
                      versions=list(request.versions)) as caller:
            self._secrets.delete(caller, request.path, list(request.versions))
            return pb.DeleteSecretResponse()

    def Undelete(self, request: pb.UndeleteSecretRequest,
                 context: grpc.ServicerContext) -> pb.UndeleteSecretResponse:
        with rpc_call(context, self._audit, "secret.undelete", request.path,
                      versions=list(request.versions)) as caller:
            self._secrets.undelete(caller, request.path, list(request.versions))
            return pb.UndeleteSecretResponse()

    def Destroy(self, request: pb.DestroySecretRequest,
                context: grpc.ServicerContext) -> pb.DestroySecretResponse:
        with rpc_call(context, self._audit, "secret.destroy", request.path,
                      versions=list(request.versions)) as caller:
            self._secrets.destroy(caller, request.path, list(request.versions))
            return pb.DestroySecretResponse()

    def Metadata(self, request: pb.SecretMetadataRequest,
                 context: grpc.ServicerContext) -> pb.SecretMetadataResponse:
        with rpc_call(context, self._audit, "secret.metadata", request.path) as caller:
            meta = self._secrets.metadata(caller, request.path)
            return pb.SecretMetadataResponse(
                path=meta.path,
                current_version=meta.current_version,
                oldest_version=meta.oldest_version,
                created=stored_time(meta.created_at, meta.path),
                updated=stored_time(meta.updated_at, meta.path),
                versions=[pb.SecretVersionInfo(version=v.version,
                                               created=stored_time(v.created_at, meta.path),
                                               deleted=stored_time(v.deleted_at, meta.path),
                                               destroyed=v.destroyed)
                          for v in meta.versions],
            )
