-- Orthanc routing recipe: push every stable study to the dxassist C-STORE SCP.
-- Orthanc configuration: "LuaScripts": ["route-to-dxassist-scp.lua"],
--   "DicomModalities": { "dxassist": [ "DXASSIST", "<dxassist host>", 11112 ] }, "StableAge": 3
-- Studies that already hold dxassist's SR series are skipped, so storing the SR back does not
-- trigger another screening. Orthanc does not retry a failed push: dxassist also polls (QIDO-RS).

local DXASSIST_SERIES = 'dxassist AI findings (preliminary)'

local function screened_already(studyId)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  for _, s in ipairs(series) do
    if s['MainDicomTags']['SeriesDescription'] == DXASSIST_SERIES then
      return true
    end
  end
  return false
end

function OnStableStudy(studyId, tags, metadata)
  if not screened_already(studyId) then
    -- the REST route sends a whole study; in Orthanc 1.10 the Lua SendToModality() expects an
    -- instance id and fails on a study id
    RestApiPost('/modalities/dxassist/store', studyId)
  end
end
