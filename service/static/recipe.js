// The training form's choices and defaults, read from the API's own schema (GET /openapi.json,
// the body of POST /v1/jobs): the server's recipe (workers/config.py TrainConfig) is their one
// home, so the form never carries a copy that could drift. Plain functions: node can test them.
"use strict";

function jobRequestSchema(openapi) {
  const ref = openapi.paths["/v1/jobs"].post.requestBody.content["application/json"].schema.$ref;
  return openapi.components.schemas[ref.split("/").pop()];
}

function recipeField(schema, name) {
  const prop = schema.properties[name];
  const typed = (prop.anyOf || [prop]).find((p) => p.type !== "null") || prop;
  return { name, default: prop.default ?? null, choices: typed.enum || [], description: prop.description || "",
           minimum: typed.minimum, maximum: typed.maximum, hint: defaultHint(schema, name, prop.default ?? null) };
}

// What the server uses when the field is left empty, in words (the placeholder of an input).
function defaultHint(schema, name, value) {
  if (value !== null) return String(value);
  const perStrategy = Object.entries(schema["x-strategy-defaults"] || {}).filter(([, d]) => name in d);
  if (perStrategy.length) return perStrategy.map(([s, d]) => `${d[name]} ${s}`).join(", ") + "; auto chooses";
  return "default";
}

if (typeof module !== "undefined") module.exports = { jobRequestSchema, recipeField, defaultHint };
