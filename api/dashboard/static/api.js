// The token lives in this tab's sessionStorage only and travels as the bearer header of each read.
const KEY = "gridfleet-token";
export const API = "/api/v1";

export class Unauthorized extends Error {}

export function token() { return sessionStorage.getItem(KEY); }
export function setToken(value) { sessionStorage.setItem(KEY, value); }
export function signOut() { sessionStorage.removeItem(KEY); }

export async function get(path) {
  const reply = await fetch(API + path, { headers: { Authorization: "Bearer " + (token() || "") } });
  const body = await reply.json().catch(() => ({}));
  if (reply.status === 401) { signOut(); throw new Unauthorized(body.message || "invalid token"); }
  if (!reply.ok) throw new Error(body.message || `${reply.status} on ${path}`);
  return body;
}

// A tiny element builder: h("td", {class: "num"}, "3"). Text is always text (never parsed as HTML).
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function fmt(value) {
  if (value === undefined || value === null) return "";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(4)));
  if (typeof value === "boolean") return value ? "true" : "false";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

export function age(unixSeconds) {
  const s = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

export function when(unixSeconds) {
  return unixSeconds ? new Date(unixSeconds * 1000).toISOString().replace("T", " ").slice(0, 19) : "";
}
