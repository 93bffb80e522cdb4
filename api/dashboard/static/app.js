// How to read the dashboard: app.js signs in and routes `#/...` to one page module (grids, grid, job,
// workers); each page's `show(root, arg, live)` draws from the JSON API and, where it polls, stops as soon
// as `live()` turns false (the user went to another page).
import { get, h, setToken, signOut, token, Unauthorized } from "./api.js";
import * as grids from "./grids.js";
import * as grid from "./grid.js";
import * as job from "./job.js";
import * as workers from "./workers.js";

const routes = { grids, grid, job, workers };
const form = document.getElementById("sign-in");
const page = document.getElementById("page");
const signOutButton = document.getElementById("sign-out");
let generation = 0;

function showSignIn(message) {
  page.replaceChildren();
  form.hidden = false;
  signOutButton.hidden = true;
  document.getElementById("sign-in-error").textContent = message || "";
}

async function route() {
  const mine = ++generation;
  if (!token()) { showSignIn(); return; }
  form.hidden = true;
  signOutButton.hidden = false;
  const [name, ...rest] = (location.hash.replace(/^#\/?/, "") || "grids").split("/");
  const module = routes[name] || grids;
  const root = h("div", { id: `page-${name in routes ? name : "grids"}` });
  page.replaceChildren(root);
  try {
    await module.show(root, decodeURIComponent(rest.join("/")), () => mine === generation);
  } catch (err) {
    if (err instanceof Unauthorized) showSignIn(err.message);
    else root.append(h("p", { class: "error", role: "alert" }, err.message));
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("token");
  setToken(input.value.trim());
  input.value = "";
  try {
    await get("/grids");  // refused tokens go back to the form with the server's message
  } catch (err) {
    showSignIn(err instanceof Unauthorized ? "Refused: " + err.message : err.message);
    return;
  }
  route();
});
signOutButton.addEventListener("click", () => { signOut(); generation++; showSignIn(); });
window.addEventListener("hashchange", route);
route();
