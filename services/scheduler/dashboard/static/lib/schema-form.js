// Form fields from the API's own description (/openapi.json): a request body's JSON schema gives
// each field its input kind, default, bounds, choices (enum) and help text, so a form built from
// it cannot drift from what the scheduler accepts. Only layout and labels come from the page.

let openapi = null; // the promise of the scheduler's OpenAPI document, fetched once per load

export function openapiDocument(page) {
  if (!openapi) {
    openapi = page.api("/openapi.json").catch((err) => {
      openapi = null;
      throw err;
    });
  }
  return openapi;
}

function resolve(doc, schema) {
  let s = schema || {};
  while (s.$ref) {
    const path = s.$ref.replace(/^#\//, "").split("/");
    s = path.reduce((node, key) => (node ? node[key.replace(/~1/g, "/").replace(/~0/g, "~")] : undefined), doc);
    if (!s) throw new Error(`openapi.json: no schema at ${schema.$ref}`);
  }
  return s;
}

// The JSON schema of the body of `method path`, its $refs resolved.
export function requestBodySchema(doc, method, path) {
  const op = ((doc.paths || {})[path] || {})[method.toLowerCase()];
  const body = op && op.requestBody && resolve(doc, op.requestBody);
  const media = body && body.content && body.content["application/json"];
  if (!media) throw new Error(`openapi.json: ${method.toUpperCase()} ${path} takes no JSON body`);
  return resolve(doc, media.schema);
}

// A property's schema without its null alternative (Optional[...] is anyOf [T, null]).
function nonNull(doc, prop) {
  const alternatives = (prop.anyOf || prop.oneOf || []).map((a) => resolve(doc, a));
  const types = alternatives.filter((a) => a.type !== "null");
  const nullable = alternatives.length > types.length;
  const base = types.length === 1 ? { ...prop, ...types[0] } : prop;
  return { schema: base, nullable };
}

function kindOf(s) {
  if (Array.isArray(s.enum)) return "select";
  if (s.type === "integer") return "int";
  if (s.type === "number") return "float";
  if (s.type === "boolean") return "bool";
  if (s.type === "string" || s.type === undefined) return "text";
  return "json"; // arrays and objects: typed as JSON
}

// "1 to 4096", "≥ 0", "> 0 and ≤ 1": the bounds of a numeric property, or "".
export function boundsText(f) {
  const lo = f.minimum !== undefined ? `≥ ${f.minimum}` : f.exclusiveMinimum !== undefined ? `> ${f.exclusiveMinimum}` : "";
  const hi = f.maximum !== undefined ? `≤ ${f.maximum}` : f.exclusiveMaximum !== undefined ? `< ${f.exclusiveMaximum}` : "";
  if (f.minimum !== undefined && f.maximum !== undefined) return `${f.minimum} to ${f.maximum}`;
  return [lo, hi].filter(Boolean).join(" and ");
}

function sentence(text) {
  if (!text) return "";
  const t = String(text).trim();
  return t.charAt(0).toUpperCase() + t.slice(1) + (/[.!?]$/.test(t) ? "" : ".");
}

function initialValue(kind, value) {
  if (value === undefined || value === null) return "";
  if (kind === "json") return JSON.stringify(value);
  return String(value);
}

// One field per property of the body schema, in the schema's order. layout[name] may give label,
// help, placeholder, list (a datalist id), value (a suggestion where the API has no default) and
// basic (shown outside "advanced" although optional); required properties are always basic.
export function schemaFields(doc, schema, layout = {}) {
  const required = new Set(schema.required || []);
  return Object.entries(schema.properties || {}).map(([name, raw]) => {
    const { schema: s, nullable } = nonNull(doc, resolve(doc, raw));
    const kind = kindOf(s);
    const look = layout[name] || {};
    const field = {
      name,
      kind,
      label: look.label || s.title || name,
      required: required.has(name),
      nullable,
      options: kind === "select" ? s.enum.map(String) : null,
      minimum: s.minimum,
      maximum: s.maximum,
      exclusiveMinimum: s.exclusiveMinimum,
      exclusiveMaximum: s.exclusiveMaximum,
      default: s.default,
      value: initialValue(kind, s.default !== undefined ? s.default : look.value),
      placeholder: look.placeholder || null,
      list: look.list || null,
    };
    field.advanced = !field.required && !look.basic;
    const bounds = kind === "int" || kind === "float" ? boundsText(field) : "";
    field.help = [
      sentence(look.help || s.description),
      bounds ? `${kind === "int" ? "An integer" : "A number"} ${bounds}.` : "",
      nullable && (s.default === undefined || s.default === null) ? "Leave empty for none." : "",
    ].filter(Boolean).join(" ");
    return field;
  });
}

// The JSON value of a field's input, or undefined where it is empty (the API's default applies).
// A number that does not parse is sent as typed, so the scheduler's 422 names the field.
export function fieldValue(f, control) {
  if (f.kind === "bool") return control.checked;
  const raw = control.value.trim();
  if (raw === "") return undefined;
  if (f.kind === "int") return /^[+-]?\d+$/.test(raw) ? Number(raw) : raw;
  if (f.kind === "float") return Number.isFinite(Number(raw)) ? Number(raw) : raw;
  if (f.kind === "json") {
    try {
      return JSON.parse(raw);
    } catch {
      return raw;
    }
  }
  return raw;
}
