() => {
  // Page helpers (voice mode is voice.js): run once by demo.load, they stay on window.omniUI.
  // On a phone the sidebar covers the whole screen, so it starts closed and closes after a pick.
  const phone = () => window.matchMedia("(max-width: 768px)").matches;
  window.omniUI = {
    closeSidebarOnPhone() {
      const open = document.querySelector(".sidebar.open");
      if (open && phone()) open.querySelector(".toggle-button").click();
    },
    // Delete asks first; with no conversation open there is nothing to confirm (the server says so).
    confirmDelete() {
      if (!document.querySelector("#conversations input:checked")) return true;
      return window.confirm("Delete this conversation and its media? This cannot be undone.");
    },
  };
  window.omniUI.closeSidebarOnPhone();
}
